"""DALL-E's transformer: the stream and its masks, cached decoding, the weighted loss, the 12B
configuration's size, sampling image tokens only, and the three stages through the one trainer."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vlm_jax import config as config_lib
from vlm_jax import models, tasks
from vlm_jax.kernels.attention.masks import DalleMask
from vlm_jax.models import dalle

DALLE = tasks.get("dalle")

_TOKENIZER = dict(name="dvae", kind="dvae", num_codes=16, hidden=8, channel_mults=(1, 2, 4), blocks_per_group=1,
                  embed_dim=8, input_kernel=3)


def _model(**overrides):
    # Three layers: row, column, conv (the "dalle" pattern), one of each mask kind.
    cfg = dict(name="dalle", text_vocab=50, text_len=6, grid=4, width=32, depth=3, heads=2, head_dim=16,
               conv_kernel=3, tokenizer=_TOKENIZER)
    cfg.update(overrides)
    return models.build(ml_collections.ConfigDict(cfg))


def _inputs(b=2, size=16):
    images = jax.random.normal(jax.random.key(1), (b, size, size, 3))
    tokens = jnp.array([[2, 5, 6, 3, 0, 0], [2, 7, 3, 0, 0, 0]][:b], jnp.int32)
    return images, tokens


def _init(model, images, tokens):
    return nn.unbox(dict(jax.jit(model.init)(jax.random.key(0), images, tokens)))


def test_layer_masks_follow_the_paper_and_bad_patterns_are_errors():
    assert dalle.layer_masks(8) == ("row", "column", "row", "row", "row", "column", "row", "conv")
    # The 12B model: column in layers 2, 6, ..., 62 (counted from 1), conv in the 64th.
    kinds = dalle.layer_masks(64)
    assert kinds.count("column") == 16 and kinds[-1] == "conv" and kinds.count("row") == 47
    assert dalle.layer_masks(3, "causal") == ("causal",) * 3
    assert dalle.layer_masks(2, "row,conv") == ("row", "conv")
    with pytest.raises(ValueError, match="unknown DALL-E mask kind"):
        dalle.layer_masks(2, "diagonal")
    with pytest.raises(ValueError, match="names 2 layers, the model has 3"):
        dalle.layer_masks(3, "row,column")


def test_stream_has_a_pad_per_position_and_the_logits_span_it():
    model = _model()
    images, tokens = _inputs()
    variables = _init(model, images, tokens)
    assert set(variables["params"]) == {
        "tokenizer", "embed", "text_pos", "row_pos", "col_pos", "transformer", "final_norm", "head"}
    assert set(variables["params"]["transformer"]) == {f"layers_{i}" for i in range(3)}
    out = jax.jit(model.apply)(variables, images, tokens)
    ids = np.asarray(out["ids"])
    # Text as given, each pad the id of its own position (50 + p), then the codes after 50 + 6.
    np.testing.assert_array_equal(ids[0, :6], [2, 5, 6, 3, 54, 55])
    np.testing.assert_array_equal(ids[1, :6], [2, 7, 3, 53, 54, 55])
    assert ids[:, 6:].min() >= 56 and ids[:, 6:].max() < 56 + 16
    np.testing.assert_array_equal(ids[:, 6:] - 56, np.asarray(out["codes"]))
    assert out["logits"].shape == (2, 6 + 16, 50 + 6 + 16) and out["logits"].dtype == jnp.float32
    shape_of = lambda *args, **kw: jax.eval_shape(functools.partial(model.apply, variables, **kw), *args)  # noqa: E731
    with pytest.raises(ValueError, match="training stream is text_len"):
        shape_of(out["ids"][:, :-1], method=model.logits)
    with pytest.raises(ValueError, match="do not fit text_len 6"):
        shape_of(jnp.ones((1, 7), jnp.int32), method=model.text_ids)
    with pytest.raises(ValueError, match="the model's grid is 4"):
        shape_of(jnp.zeros((1, 32, 32, 3)), tokens[:1])


def test_each_layer_sees_only_what_its_mask_allows():
    """One row-attention layer: the logits at a position do not move when a token its mask hides
    changes, and do when a token it sees changes."""
    model = _model(depth=1, mask_pattern="row")
    images, tokens = _inputs(b=1)
    variables = _init(model, images, tokens)
    ids = jax.jit(model.apply)(variables, images, tokens)["ids"]
    logits = jax.jit(lambda i: model.apply(variables, i, method=model.logits))
    mask = DalleMask("row", 6, 4)
    q = 6 + 9  # an image position; row attention sees raster indices 9 - 4 .. 9 and all the text
    hidden, seen = 6 + 3, 6 + 6
    assert not mask.allowed(np.array(q), np.array(hidden)) and mask.allowed(np.array(q), np.array(seen))
    base = logits(ids)[0, q]
    moved = lambda k: float(jnp.abs(logits(ids.at[0, k].set(56 + (ids[0, k] - 55) % 16))[0, q] - base).max())  # noqa: E731
    assert moved(hidden) == 0.0
    assert moved(seen) > 1e-4 and moved(2) > 1e-4  # an image token in reach, a text token


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_gives_the_full_forward_logits(scan):
    """Unrolled, and scanned (one nn.scan, each layer's mask picked by lax.switch, params stacked)."""
    from vlm_jax.layers.transformer import stack_layers

    model = _model()
    images, tokens = _inputs()
    variables = _init(model, images, tokens)
    out = jax.jit(model.apply)(variables, images, tokens)
    full, ids, codes = out["logits"], out["ids"], out["codes"]
    params = variables["params"]
    if scan:
        model = _model(scan_layers=True)
        params = {**params, "transformer": stack_layers(params["transformer"])}
        np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, images, tokens)["logits"], full, atol=1e-5)
    decoder = model.make_decoder()
    step = jax.jit(decoder.step)
    cache = decoder.init_cache(params, 2)
    positions = jnp.broadcast_to(jnp.arange(6)[None], (2, 6))
    got, cache = step(params, cache, ids[:, :6], positions, jnp.ones((2, 6), bool))
    # The decoder's logits are the image codes' (sampling then acts over image tokens only).
    assert got.shape == (2, 6, 16)
    np.testing.assert_allclose(got, full[:, :6, 56:], atol=1e-5)
    for r in range(15):
        got, cache = step(params, cache, codes[:, r : r + 1], jnp.full((2, 1), 6 + r), jnp.ones((2, 1), bool))
        np.testing.assert_allclose(got[:, 0], full[:, 6 + r, 56:], atol=1e-5)
    # Beam search's row gather keeps each row's cache (the scanned cache has its rows on axis 1).
    swapped = decoder.select(cache, jnp.array([1, 0]))
    again, _ = step(params, swapped, codes[::-1, 15:16], jnp.full((2, 1), 21), jnp.ones((2, 1), bool))
    direct, _ = step(params, cache, codes[:, 15:16], jnp.full((2, 1), 21), jnp.ones((2, 1), bool))
    np.testing.assert_allclose(again, direct[::-1], atol=1e-6)


def test_dropout_acts_only_in_training():
    """model.dropout: evaluation equals the model without it; training draws its masks from the dropout
    rng (scanned layers: the rng split per layer; the unrolled blocks are the same Block)."""
    images, tokens = _inputs()
    plain, dropping = _model(scan_layers=True), _model(scan_layers=True, dropout=0.3)
    variables = _init(plain, images, tokens)
    evaluated = jax.jit(plain.apply)(variables, images, tokens)["logits"]
    np.testing.assert_allclose(jax.jit(dropping.apply)(variables, images, tokens)["logits"], evaluated, atol=1e-6)
    train = jax.jit(lambda seed: dropping.apply(variables, images, tokens, train=True,
                                                rngs={"dropout": jax.random.key(seed)})["logits"])
    assert np.abs(train(0) - evaluated).max() > 1e-3
    np.testing.assert_array_equal(train(1), train(1))
    assert np.abs(train(1) - train(2)).max() > 1e-3


def test_code_features_read_the_tokenizer_codebook_in_and_out():
    """model.code_features: an image code's input is (adds, for "add") code_in(its standardised
    codebook vector), and the image ids' logits are (add) code_out(x) . vectors (+ code_bias); the
    cached decoder (given the variables: a VQ codebook lives in vq_stats) matches the full forward."""
    tok = dict(_TOKENIZER, kind="vqvae", vq=dict(beta=0.25, ema=True, decay=0.99, dead_code_threshold=0.0))
    images, tokens = _inputs()
    for mode in ("add", "only"):
        model = _model(code_features=mode, tokenizer=tok)
        variables = _init(model, images, tokens)
        params = variables["params"]
        assert {"code_in", "code_out"} <= set(params) and "vq_stats" in variables
        assert ("code_bias" in params) == (mode == "only")
        apply = jax.jit(model.apply)
        out = apply(variables, images, tokens)
        full, ids, codes = out["logits"], out["ids"], out["codes"]

        def logits_with(**changed):
            return apply({**variables, "params": {**params, **changed}}, images, tokens)["logits"]

        # Zeroing code_out changes the image ids' logits only; zeroing the image ids' rows of the
        # embedding table and columns of the head changes nothing under "only".
        no_shared = logits_with(code_out=jax.tree.map(jnp.zeros_like, params["code_out"]))
        np.testing.assert_allclose(no_shared[..., :56], full[..., :56], atol=1e-5)
        assert not np.allclose(no_shared[..., 56:], full[..., 56:], atol=1e-4)
        table = params["embed"]["embedding"].at[56:].set(0)
        head = params["head"]["kernel"].at[:, 56:].set(0)
        unused = logits_with(embed={"embedding": table}, head={"kernel": head})
        assert np.allclose(unused, full, atol=1e-5) == (mode == "only")
    with pytest.raises(ValueError, match="code_features"):
        _init(_model(code_features="both", tokenizer=tok), images, tokens)
    decoder = model.make_decoder()  # the "only" model's (the tiny config's), from its variables
    step = jax.jit(decoder.step)
    cache = decoder.init_cache(variables, 2)
    got, cache = step(variables, cache, ids[:, :6], jnp.broadcast_to(jnp.arange(6)[None], (2, 6)), jnp.ones((2, 6), bool))
    np.testing.assert_allclose(got, full[:, :6, 56:], atol=1e-5)
    for r in range(4):
        got, cache = step(variables, cache, codes[:, r : r + 1], jnp.full((2, 1), 6 + r), jnp.ones((2, 1), bool))
        np.testing.assert_allclose(got[:, 0], full[:, 6 + r, 56:], atol=1e-5)


_CLIP_TEXT = dict(vocab_size=50, context_length=6, width=16, depth=1, heads=2, mlp_ratio=2.0, eos_id=3)


def test_text_condition_reads_a_frozen_clip_tower_and_the_cache_keeps_it():
    """model.text_condition "clip": condition_in(the CLIP tower's scaled embedding of the caption)
    joins every position's input; the tower gets no gradient; the prompt's decoding call computes
    the condition and the image tokens' calls read it from the cache."""
    model = _model(text_condition="clip", clip_text=_CLIP_TEXT, clip_embed_dim=8)
    images, tokens = _inputs()
    variables = _init(model, images, tokens)
    params = variables["params"]
    assert {"clip_text", "clip_projection", "condition_in"} <= set(params)
    apply = jax.jit(model.apply)
    out = apply(variables, images, tokens)
    full, ids, codes = out["logits"], out["ids"], out["codes"]
    # Zeroing condition_in removes the condition; the tower then matters no more.
    zero = {**params, "condition_in": jax.tree.map(jnp.zeros_like, params["condition_in"])}
    assert not np.allclose(apply({**variables, "params": zero}, images, tokens)["logits"], full, atol=1e-4)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({**variables, "params": p}, images, tokens)["logits"])))(params)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads["clip_text"]))
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["condition_in"]))
    decoder = model.make_decoder(guidance=2.0)
    step = jax.jit(decoder.step)
    cache = decoder.init_cache(variables, 2)
    got, cache = step(variables, cache, ids[:, :6], jnp.broadcast_to(jnp.arange(6)[None], (2, 6)), jnp.ones((2, 6), bool))
    for r in range(3):
        got, cache = step(variables, cache, codes[:, r : r + 1], jnp.full((2, 1), 6 + r), jnp.ones((2, 1), bool))
    # Guided: the conditional half equals the full forward, the unconditional half the empty caption's.
    # (The unconditional stream: an all-pads prompt, then the same codes.)
    empty = jnp.zeros_like(tokens)
    blank_ids = jnp.concatenate([model.apply(variables, empty, method=model.text_ids), ids[:, 6:]], axis=1)
    uncond = jax.jit(functools.partial(model.apply, method=model.logits))(variables, blank_ids)[:, 8, 56:]
    cond = full[:, 8, 56:]
    np.testing.assert_allclose(got[:, 0], uncond + 2.0 * (cond - uncond), atol=1e-4)
    with pytest.raises(ValueError, match="text_condition"):
        _init(_model(text_condition="clip"), images, tokens)


def test_loss_is_an_eighth_text_and_seven_eighths_image_cross_entropy():
    # Hand-made stream: text_len 3, 2 image tokens, text ids < 4 (image_offset 4), codes 0..1.
    ids = jnp.array([[1, 2, 3, 4, 5]])
    logits = jnp.full((1, 5, 6), -1e9).at[0, 0, 2].set(0.0).at[0, 0, 3].set(0.0)  # 2 of 2: ln 2
    logits = logits.at[0, 1, 3].set(0.0)  # right: 0
    logits = logits.at[0, 2, 4].set(0.0)  # image code 0 for target 4: right
    logits = logits.at[0, 3, 4].set(0.0).at[0, 3, 5].set(-5.0)  # target 5 (code 1): 5 + ln(1 + e^-5)
    parts = jax.jit(DALLE.stream_losses, static_argnums=(2, 3))(logits, ids, 3, 4)
    np.testing.assert_allclose(parts["text_loss"], np.log(2) / 2, rtol=1e-6)
    np.testing.assert_allclose(parts["image_loss"], (5.0 + np.log1p(np.exp(-5.0))) / 2, rtol=1e-6)
    np.testing.assert_allclose(parts["image_acc"], 0.5)
    # The text part never scores image ids and the image part never text ids.
    assert parts["text_loss"] < 1 and parts["image_loss"] < 3

    model = _model()
    images, tokens = _inputs()
    variables = _init(model, images, tokens)
    config = ml_collections.ConfigDict(dict(task=dict(name="dalle", text_loss_weight=0.125)))
    batch = {"image": images, "tokens": tokens}
    loss_fn = lambda p: DALLE.loss_fn(model, p, batch, jax.random.key(0), config, {})  # noqa: E731
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    m = aux["metrics"]
    np.testing.assert_allclose(loss, 0.125 * m["text_loss"] + 0.875 * m["image_loss"], rtol=1e-6)
    np.testing.assert_allclose(m["image_perplexity"], np.exp(m["image_loss"]), rtol=1e-5)
    # The tokenizer is frozen inside the loss: no gradient reaches it.
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["tokenizer"]))
    assert float(jnp.abs(grads["head"]["kernel"]).max()) > 0.0


def test_the_12b_configuration_has_its_published_size():
    config = config_lib.load("configs/dalle.py:12b")
    model = models.build(config)
    assert (model.depth, model.width, model.heads, model.head_dim) == (64, 3968, 62, 64)
    assert (model.text_len, model.text_vocab, model.grid, model.num_codes) == (256, 16384, 32, 8192)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32),
                            jax.ShapeDtypeStruct((1, 256), jnp.int32))["params"]
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    # 64 * 12 * 3968^2 weights plus biases, norms, the 24,832-id embedding and head, the positions.
    assert count(shapes) - count(shapes["tokenizer"]) == 12_293_824_256
    assert config.optim.trainable == "^(?!tokenizer/)" and config.train.init_from_map == "tokenizer:."


def test_sampling_draws_image_codes_and_top_k_1_is_greedy():
    model = _model()
    images, tokens = _inputs()
    variables = _init(model, images, tokens)
    codes = DALLE.sample_codes(model, variables, tokens, jax.random.key(3), temperature=1.0, top_k=1)
    greedy = DALLE.sample_codes(model, variables, tokens, jax.random.key(4), temperature=0.0)
    assert codes.shape == (2, 16) and codes.min() >= 0 and codes.max() < 16
    np.testing.assert_array_equal(codes, greedy)
    # Greedy codes are each position's argmax under the full forward of the drawn stream.
    stream = jnp.concatenate([model.apply(variables, tokens, method=model.text_ids), 56 + jnp.asarray(codes)], 1)
    full = model.apply(variables, stream, method=model.logits)
    np.testing.assert_array_equal(np.argmax(full[:, 5:-1, 56:], axis=-1), codes)
    config = ml_collections.ConfigDict(dict(task=dict(temperature=1.0, top_k=1)))  # the loop compiled above
    drawn = DALLE.generate(model, variables, tokens, jax.random.key(0), config)
    assert drawn.shape == (2, 16, 16, 3) and bool(jnp.all(jnp.isfinite(drawn)))


def test_classifier_free_guidance_mixes_the_empty_text_stream():
    """guidance s: greedy codes are the argmax of l_u + s (l_c - l_u), l_u the stream whose text is
    all pads (what task.text_drop trains on); s = 1 is the conditional model; guidance_floor keeps
    the codes the conditional model finds plausible."""
    model = _model()
    images, tokens = _inputs()
    variables = _init(model, images, tokens)
    plain = DALLE.sample_codes(model, variables, tokens, jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(DALLE.sample_codes(model, variables, tokens, jax.random.key(0), temperature=0.0,
                                                     guidance=1.0), plain)
    guided = DALLE.sample_codes(model, variables, tokens, jax.random.key(0), temperature=0.0, guidance=3.0)
    text = model.apply(variables, tokens, method=model.text_ids)
    empty = model.apply(variables, jnp.zeros_like(tokens), method=model.text_ids)
    np.testing.assert_array_equal(empty, 50 + np.arange(6)[None].repeat(2, 0))

    def logits(prefix):
        stream = jnp.concatenate([prefix, 56 + jnp.asarray(guided)], 1)
        return model.apply(variables, stream, method=model.logits)[:, 5:-1, 56:]

    cond, uncond = logits(text), logits(empty)
    np.testing.assert_array_equal(np.argmax(uncond + 3.0 * (cond - uncond), axis=-1), guided)
    assert not np.array_equal(guided, plain)  # random weights: guidance changes the drawing
    # guidance_floor a: the argmax over the codes with p_cond >= a max p_cond only.
    guided = DALLE.sample_codes(model, variables, tokens, jax.random.key(0), temperature=0.0, guidance=3.0,
                                guidance_floor=0.5)
    cond, uncond = logits(text), logits(empty)
    logp = jax.nn.log_softmax(cond, axis=-1)
    plausible = logp >= logp.max(-1, keepdims=True) + np.log(0.5)
    np.testing.assert_array_equal(np.argmax(np.where(plausible, uncond + 3.0 * (cond - uncond), -np.inf), -1), guided)
    for bad in (dict(guidance=-1.0), dict(guidance=3.0, guidance_floor=1.0), dict(guidance_floor=0.1)):
        with pytest.raises(ValueError, match="guidance"):
            model.make_decoder(**bad)
    # text_drop 1: every caption replaced by the empty text, i.e. the loss of all-pad tokens.
    batch = {"image": images, "tokens": tokens}
    loss = lambda drop, b: DALLE.loss_fn(  # noqa: E731
        model, variables["params"], b, jax.random.key(0),
        ml_collections.ConfigDict(dict(task=dict(name="dalle", text_drop=drop))), {})[0]
    np.testing.assert_allclose(loss(1.0, batch), loss(0.0, {**batch, "tokens": jnp.zeros_like(tokens)}), rtol=1e-6)
    assert abs(float(loss(1.0, batch)) - float(loss(0.0, batch))) > 1e-4


def test_word_drop_replaces_inner_pieces_only():
    """task.word_drop: bos (first) and eos (last non-pad) stay, pads stay, inner pieces become pads."""
    tokens = jnp.asarray([[2, 10, 11, 12, 3, 0, 0], [0] * 7, [2, 3, 0, 0, 0, 0, 0]], jnp.int32)
    rng = jax.random.key(0)
    np.testing.assert_array_equal(DALLE.drop_words(tokens, rng, 1.0, 0),
                                  [[2, 0, 0, 0, 3, 0, 0], [0] * 7, [2, 3, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(DALLE.drop_words(tokens, rng, 0.0, 0), tokens)
    many = jnp.tile(tokens[:1], (2000, 1))
    dropped = np.asarray(DALLE.drop_words(many, rng, 0.25, 0))[:, 1:4] == 0
    assert 0.22 < dropped.mean() < 0.28 and dropped.all(axis=1).mean() < 0.05  # independent pieces


def _staged(make):
    """configs/dalle.py:tiny_clip_text's three stages (tiny's, and the transformer also reads the
    CLIP stage's text tower), a few steps of narrow models on the small world (the evaluator, the
    CLIP's other use, is left to the slow test)."""
    config = make("configs/dalle.py:tiny_clip_text", {
        "model.width": 32, "model.depth": 2, "model.heads": 2, "model.head_dim": 16,
        "model.tokenizer.hidden": 8, "model.tokenizer.embed_dim": 16, "model.tokenizer.num_codes": 32,
        "model.clip_text.width": 16, "model.clip_text.depth": 1, "model.clip_text.heads": 2, "model.clip_embed_dim": 16,
    })
    with config.unlocked():
        small = lambda **kw: ml_collections.ConfigDict(kw)  # noqa: E731
        config.stages.tokenizer.update(small(
            data=small(batch_size=8), evals=small(val=small(num_examples=8, batch_size=8)),
            model=small(hidden=8, embed_dim=16, num_codes=32), train=small(steps=2, eval_every=0, ckpt_every=1000)))
    return config


def test_stages_train_the_tokenizer_then_the_transformer_on_it(staged_smoke_config, tmp_path):
    """The smoke test of test_tiny_dalle_learns_to_draw_the_prompt (-m slow): tiny's three stages,
    run as tiny_clip_text (which adds the CLIP text condition) so that one smoke covers both."""
    from PIL import Image

    from vlm_jax import cli
    from vlm_jax.train import stages

    run = str(tmp_path / "run")
    summaries = stages.train_stages(_staged(staged_smoke_config), run, devices=jax.devices()[:1])
    assert [(n, s["finished"]) for n, s in summaries] == [("clip", True), ("tokenizer", True), ("transformer", True)]
    # The tokenizer arrives whole (params and the VQ codebook's EMA statistics) and stays frozen.
    read = lambda stage, step: ocp.StandardCheckpointer().restore(f"{run}/{stage}/checkpoints/{step}/state")  # noqa: E731
    tok, trans = read("tokenizer", 2), read("transformer", 2)
    assert "tokenizer" not in trans["params"]  # frozen params are not stored again
    for x, y in zip(jax.tree.leaves(tok["model_state"]), jax.tree.leaves(trans["model_state"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    from vlm_jax.sampling.sample import load_for_sampling

    _, model, variables, _ = load_for_sampling(f"{run}/transformer")
    for x, y in zip(jax.tree.leaves(tok["params"]), jax.tree.leaves(variables["params"]["tokenizer"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The text condition's tower is the CLIP stage's (train.init_also "stage:clip=..."), frozen.
    clip = read("clip", 2)["params"]
    assert "clip_text" not in trans["params"] and "condition_in" in trans["params"]
    for ours, theirs in (("clip_text", "text"), ("clip_projection", "text_projection")):
        for x, y in zip(jax.tree.leaves(clip[theirs]), jax.tree.leaves(variables["params"][ours])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # vlm-jax sample on the run of stages: a row per prompt.
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", "--workdir", run, "--prompt", "a red circle.", "a blue square.", "-n", "2",
                     "--out", str(grid)]) == 0
    assert Image.open(grid).size[0] > 2 * 64
    assert cli.main(["sample", "--workdir", run, "--prompt", "a red circle.", "-n", "4", "--rerank", "2"]) == 2


def test_best_of_n_keeps_the_highest_clip_scores_best_first():
    from vlm_jax.sampling import images

    class Judge:  # embeddings along one axis each: image i scores cos = its own value
        def embed_texts(self, texts):
            return np.array([[1.0, 0.0]] * len(texts), np.float32)

        def embed_images(self, imgs):
            c = imgs[:, 0, 0, 0].astype(np.float32) / 255.0
            return np.stack([c, np.sqrt(1 - c**2)], axis=1)

    draws = np.zeros((5, 2, 2, 3), np.uint8)
    draws[:, 0, 0, 0] = [10, 200, 50, 255, 120]
    best = images.best_of(Judge(), draws, "a red circle.", 3)
    np.testing.assert_array_equal(best[:, 0, 0, 0], [255, 200, 120])


@pytest.mark.slow
def test_tiny_dalle_learns_to_draw_the_prompt(tmp_path):
    """configs/dalle.py:tiny as it is, every stage on the full built-in world (its default smoke
    test is test_stages_train_the_tokenizer_then_the_transformer_on_it): the tokenizer
    keeps every attribute at 0.95 or better; one sample per validation prompt gets the main object
    right well above the shuffled-prompt floor (near chance), held-out pairs included, and CLIP's
    best of 8 beats one sample. Issue 15 asks for 0.6 overall. On one device, as `vlm-jax train`
    runs it on a CPU: the README's runs gave 0.766 (seen 0.908, held-out 0.640, best of 8 0.832) and,
    seed 1, 0.723 (held-out 0.640); this test's (tests/conftest.py draws random bits by the other
    threefry, so other initial weights) 0.672 (seen 0.767, held-out 0.588), best of 8 0.785,
    shuffled 0.059, 20m16s. The bounds leave room for another machine's numerics."""
    from vlm_jax.train import stages

    config = config_lib.load("configs/dalle.py:tiny", {"train.progress": False})
    summaries = dict(stages.train_stages(config, str(tmp_path / "run"), devices=jax.devices()[:1]))
    tok = summaries["tokenizer"]["eval"]
    assert min(tok[f"val/recon/{a}_acc"] for a in ("color", "shape", "size", "position")) >= 0.95
    ev = summaries["transformer"]["eval"]
    assert ev["val/gen/main_acc"] >= 0.6 and ev["val/gen/main_acc_seen"] >= 0.7
    assert ev["val/gen/main_acc_heldout"] >= 0.5
    assert ev["val/gen/shuffled/main_acc"] < 0.1
    assert ev["val/gen/rerank/main_acc"] > ev["val/gen/main_acc"]
    from vlm_jax import cli  # best of 8 by the CLIP stage, the judge the evaluator names

    grid = tmp_path / "best.png"
    assert cli.main(["sample", "--workdir", str(tmp_path / "run"), "--prompt", "a large red circle on the left",
                     "-n", "4", "--rerank", "8", "--out", str(grid)]) == 0 and grid.exists()
