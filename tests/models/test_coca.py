"""CoCa: shapes, poolers, causality, cross-attention, loss weights, cached greedy decoding."""

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax import models, tasks
from vlm_jax.config_defaults import DEFAULT_RULES
from vlm_jax.layers.transformer import stack_layers
from vlm_jax.models import coca
from vlm_jax.sampling import decode

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "coca.py")
LOGICAL = {name for name, _ in DEFAULT_RULES}
B, L, V, E = 2, 8, 32, 12
QUERIES = 3


def _key(seed=0):
    # rbg keys: threefry's random bits take XLA:CPU seconds to compile.
    return jax.random.key(seed, impl="rbg")


def _config(**model_overrides):
    config = config_lib.load(f"{CONFIG}:tiny")
    with config.unlocked():
        m = config.model
        m.image.update(image_size=16, patch_size=4, width=16, depth=1, heads=2, mlp_ratio=2.0)
        m.text.update(vocab_size=V, context_length=L, width=16, unimodal_depth=1, multimodal_depth=1,
                      heads=2, mlp_ratio=2.0)
        m.update(embed_dim=E, caption_queries=QUERIES, pooler_heads=2)
        m.update(model_overrides)
    return config


@functools.lru_cache(maxsize=None)
def _model(scan_layers=False):
    model = models.build(_config(scan_layers=scan_layers))
    apply = jax.jit(model.apply, static_argnames=("method", "train"))
    return model, apply


@functools.lru_cache(maxsize=None)
def _variables():
    """Boxed params with the model's shapes and names, filled from numpy: compiling model.init
    takes XLA:CPU seconds (its random initialisers), most of this file's budget."""
    model, _ = _model()
    images, tokens = _inputs()
    shapes = jax.eval_shape(model.init, _key(), images, tokens)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]  # past the box's .value
        name = keys[-1]
        if name == "logit_scale":
            return jnp.full(leaf.shape, np.log(1 / 0.07), leaf.dtype)
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        std = leaf.shape[0] ** -0.5 if leaf.ndim >= 2 and name == "kernel" else 0.5
        return jnp.asarray(rng.normal(size=leaf.shape) * std, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _inputs(b=B, seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(b, 16, 16, 3)), jnp.float32)
    tokens = np.asarray(rng.integers(4, V, (b, L)), np.int32)
    tokens[:, 0] = 2  # bos
    tokens[0, 5], tokens[0, 6:] = 3, 0  # eos, then padding
    tokens[1, 7] = 3
    return images, jnp.asarray(tokens)


def _params():
    return nn.unbox(_variables())["params"]


def test_shapes_poolers_and_logical_axes():
    model, apply = _model()
    params = _params()
    images, tokens = _inputs()
    out = apply({"params": params}, images, tokens)
    assert out["image_embeds"].shape == out["text_embeds"].shape == (B, E)
    assert out["logits"].shape == (B, L, V) and out["logits"].dtype == jnp.float32
    assert out["logit_scale"].shape == ()
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_embeds"], axis=-1), 1.0, rtol=1e-5)
    # encode_image / encode_text: projected, unnormalised, the same directions as __call__'s.

    @jax.jit
    def methods(params, images, tokens):  # one compile for the three
        v = {"params": params}
        return (
            model.apply(v, images, method="encode_image"),
            model.apply(v, tokens, method="encode_text"),
            model.apply(v, images, method="poolers"),
        )

    img, txt, pooled = methods(params, images, tokens)
    assert img.shape == txt.shape == (B, E)
    np.testing.assert_allclose(img / np.linalg.norm(img, axis=-1, keepdims=True), out["image_embeds"], atol=1e-5)
    np.testing.assert_allclose(txt / np.linalg.norm(txt, axis=-1, keepdims=True), out["text_embeds"], atol=1e-5)
    assert pooled["contrastive"].shape == (B, 1, 16)
    assert pooled["caption"].shape == (B, QUERIES, 16)
    assert params["caption_pooler"]["queries"].shape == (QUERIES, 16)
    assert params["text_pos_embedding"].shape == (L + 1, 16)
    assert "cross_attn" in params["multimodal"]["layers_0"]
    assert "cross_attn" not in params["unimodal"]["layers_0"]
    # Every param carries logical axis names the sharding rules know.
    boxed = _variables()["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) - {None} <= LOGICAL, leaf.names


def test_text_decoder_is_causal_and_cls_sees_all_tokens():
    _, apply = _model()
    params = _params()
    images, tokens = _inputs()
    t = 3
    changed = tokens.at[:, t].set(jnp.where(tokens[:, t] == 5, 6, 5))
    a = apply({"params": params}, images, tokens)
    b = apply({"params": params}, images, changed)
    np.testing.assert_allclose(a["logits"][:, :t], b["logits"][:, :t], atol=1e-5)
    assert np.abs(np.asarray(a["logits"][:, t:] - b["logits"][:, t:])).max(axis=(1, 2)).min() > 1e-4
    # The [CLS] text embedding reads every token, the last real one (eos) included.
    assert np.abs(np.asarray(a["text_embeds"] - b["text_embeds"])).max(axis=1).min() > 1e-5
    last = tokens.at[0, 4].set(7 if int(tokens[0, 4]) != 7 else 8)
    c = apply({"params": params}, images, last)
    assert np.abs(np.asarray(a["text_embeds"][0] - c["text_embeds"][0])).max() > 1e-5
    # ...but no image: the text tower is unimodal.
    d = apply({"params": params}, images[::-1], tokens)
    np.testing.assert_allclose(a["text_embeds"], d["text_embeds"], atol=1e-6)
    # Cross-attention: another image changes the caption logits (at every position).
    assert np.abs(np.asarray(a["logits"] - d["logits"])).max(axis=(2,)).min() > 1e-5


def test_loss_weights_and_caption_loss():
    model, apply = _model()
    params = _params()
    images, tokens = _inputs()
    batch = {"image": images, "tokens": tokens}
    task = tasks.get("coca")
    assert task.model_inputs(batch)[1] is tokens

    @jax.jit
    def loss(params, batch, w_con, w_cap):
        # Traced weights: one compile for every weighting.
        config = ml_collections.ConfigDict(
            dict(task=dict(contrastive_weight=w_con, caption_weight=w_cap), model=dict(text=dict(pad_id=0)))
        )
        return task.loss_fn(model, params, batch, _key(1), config, {})

    total, aux = loss(params, batch, 1.0, 2.0)
    m = aux["metrics"]
    np.testing.assert_allclose(total, m["contrastive_loss"] + 2.0 * m["caption_loss"], rtol=1e-5)
    only_con, _ = loss(params, batch, 1.0, 0.0)
    only_cap, _ = loss(params, batch, 0.0, 1.0)
    np.testing.assert_allclose(only_con, m["contrastive_loss"], rtol=1e-5)
    np.testing.assert_allclose(only_cap, m["caption_loss"], rtol=1e-5)
    # Caption loss: NLL of tokens[t+1] at position t, padding targets left out.
    logits = np.asarray(apply({"params": params}, images, tokens)["logits"], np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok = np.asarray(tokens)
    nll = [-logp[r, i, tok[r, i + 1]] for r in range(B) for i in range(L - 1) if tok[r, i + 1] != 0]
    assert len(nll) == float(m["caption_tokens"]) == 2 * (L - 1) - 2
    np.testing.assert_allclose(m["caption_loss"], np.mean(nll), rtol=1e-4)
    assert 0.0 <= float(m["token_accuracy"]) <= 1.0
    assert np.isfinite(float(m["loss"]))


def _teacher_forced_greedy(apply, params, images, prompts, steps):
    """Greedy continuation of each prompt by re-running the teacher-forced model every step."""
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        padded = jnp.asarray([seq + [0] * (L - len(seq)) for seq in seqs], jnp.int32)
        logits = apply({"params": params}, images, padded)["logits"]
        for r, seq in enumerate(seqs):
            seq.append(int(jnp.argmax(logits[r, len(seq) - 1])))
    return [seq[len(p):] for seq, p in zip(seqs, prompts)]


def test_greedy_decode_equals_teacher_forced_argmax():
    model, apply = _model()
    params = _params()
    images, _ = _inputs()
    prompts = [[2], [2, 9, 14]]
    new = 5
    decoder = model.make_decoder()
    assert decoder.max_len == L and hash(decoder) == hash(model.make_decoder())
    got = decode.generate(decoder, params, prompts, max_new_tokens=new, context=images, stop_tokens=())
    want = _teacher_forced_greedy(apply, params, images, prompts, new)
    assert got == want

    # The beam search gathers cache rows with select: context and KV caches follow the rows,
    # the cache index (no batch axis) stays.
    kv = {"layers_0": {"attn": {"cached_key": jnp.arange(B * 3).reshape(B, 3), "cache_index": jnp.int32(2)}}}
    cache = {"context": jnp.arange(B * 2).reshape(B, 2), "kv": kv}
    swapped = decoder.select(cache, jnp.asarray([1, 0, 1]))
    np.testing.assert_array_equal(swapped["context"], cache["context"][jnp.asarray([1, 0, 1])])
    np.testing.assert_array_equal(
        swapped["kv"]["layers_0"]["attn"]["cached_key"], kv["layers_0"]["attn"]["cached_key"][jnp.asarray([1, 0, 1])]
    )
    assert int(swapped["kv"]["layers_0"]["attn"]["cache_index"]) == 2

    # Scanned layers (stacked params, a [depth, B, ...] cache) decode the same tokens.
    scanned, _ = _model(scan_layers=True)
    assert decode.generate(
        scanned.make_decoder(), stack_layers(params), prompts, max_new_tokens=new, context=images, stop_tokens=()
    ) == want


def test_tiny_and_base_configs_build():
    config = config_lib.load(f"{CONFIG}:tiny")
    assert config.task.name == "coca" and config.model.name == "coca"
    assert (config.task.contrastive_weight, config.task.caption_weight) == (1.0, 2.0)
    assert tuple(config.evals.val.kinds) == ("zero_shot", "retrieval")
    model = models.build(config)
    assert isinstance(model, coca.CoCa)
    b, size, length = 2, config.data.image_size, config.data.text_length
    shapes = jax.eval_shape(
        model.init, _key(), jnp.zeros((b, size, size, 3)), jnp.zeros((b, length), jnp.int32)
    )
    params = nn.unbox(shapes["params"])
    assert params["caption_pooler"]["queries"].shape == (16, 128)
    assert params["image"]["pos_embed"]["pos_embedding"].shape == ((32 // 8) ** 2, 128)
    assert tuple(config.evals.caption.kinds) == ("caption",) and config.evals.caption.grounding
    assert len(params["unimodal"]) == len(params["multimodal"]) == 2
    assert params["lm_head"]["kernel"].shape == (128, 512)
    base = config_lib.load(f"{CONFIG}:base").model
    assert (base.image.image_size // base.image.patch_size) ** 2 == base.caption_queries == 256
    assert (base.text.unimodal_depth, base.text.multimodal_depth, base.text.width) == (12, 12, 768)


@pytest.mark.slow
def test_tiny_config_trains_and_evaluates(world_cache, tmp_path):
    from vlm_jax.train.metrics import read_metrics
    from vlm_jax.train.trainer import train

    config = config_lib.load(
        f"{CONFIG}:tiny",
        {
            "data.tfds_data_dir": str(world_cache / "tfds"),
            "data.batch_size": 32,
            "tokenizer.path": str(world_cache / "tokenizer.model"),
            "model.image.width": 64,
            "model.image.depth": 2,
            "model.text.width": 64,
            "model.text.unimodal_depth": 1,
            "model.text.multimodal_depth": 1,
            "model.embed_dim": 64,
            "train.steps": 60,
            "optim.warmup_steps": 5,
            "train.log_every": 1,
            "train.eval_every": 60,
            "train.ckpt_every": 1000,
            "train.progress": False,
            "train.async_checkpoints": False,
        },
    )
    with config.unlocked():
        config.data.world_num_examples.update(dict(train=512, validation=64, test=64))
        config.evals.val.num_examples = 64
    train(config, str(tmp_path / "coca"))
    records = list(read_metrics(tmp_path / "coca"))
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    captions = [r["train/caption_loss"] for r in records if "train/caption_loss" in r]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    assert np.mean(captions[-5:]) < 0.7 * np.mean(captions[:3])
    assert any(any("zero_shot" in k for k in r) for r in records), records[-1].keys()
