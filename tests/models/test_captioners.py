"""Show and Tell / Show, Attend and Tell: shapes, teacher-forcing alignment, attention and its
penalty, hard-attention gradients, decoding through vlm_jax.sampling.decode, and a short run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax.models import show_attend_tell, show_tell
from vlm_jax.sampling import decode
from vlm_jax.tasks import caption

V, S, L = 23, 8, 7
VGG = ml_collections.ConfigDict(dict(kind="vgg", stages=((1, 4), (1, 8)), norm="layer"))  # 8x8 -> 4x4x8


def _cfg(name, **kw):
    cfg = dict(name=name, vocab_size=V, embed_dim=16, hidden=16, attn_dim=8, encoder=VGG)
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def _images(b, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, S, S, 3))


def _tokens(b, seed=1):
    t = np.array(jax.random.randint(jax.random.key(seed), (b, L), 4, V), np.int32)
    t[:, 0] = 2
    t[0, 5:] = [3, 0]  # a short caption: eos then pad
    return jnp.asarray(t)


def _build(module, **kw):
    model = module.from_config(_cfg(module.__name__.rsplit(".", 1)[1], **kw))
    images, tokens = _images(2), _tokens(2)
    variables = nn.unbox(jax.jit(lambda r: model.init({"params": r}, images, tokens))(jax.random.key(0)))
    params = variables["params"]
    # Sharper output distributions than the init's, so greedy choices are clear.
    params["out"]["kernel"] = params["out"]["kernel"] * 8.0
    return model, variables


@pytest.fixture(scope="module")
def st():
    return _build(show_tell)


@pytest.fixture(scope="module")
def st_inject():
    """Show and Tell with the image embedding beside every word (image_input every_step)."""
    return _build(show_tell, image_input="every_step", image_norm="layer")


@pytest.fixture(scope="module")
def sat():
    return _build(show_attend_tell)


@pytest.fixture(scope="module")
def sat_cnn():
    """Show, Attend and Tell over a SmallCNN's last stage before its pool (8x8 -> 4x4x8), h0/c0
    from the tower's image vector."""
    cnn = ml_collections.ConfigDict(dict(kind="cnn", channels=(4, 8), norm="layer", pool="flatten", output_dim=8))
    return _build(show_attend_tell, encoder=cnn, init_from="pooled")


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out


@pytest.mark.parametrize("which", ["st", "st_inject", "sat", "sat_cnn"])
def test_shapes_and_teacher_forcing_alignment(which, request):
    model, variables = request.getfixturevalue(which)
    images, tokens = _images(3), _tokens(3)
    changed = tokens.at[:, 4].set(5 + tokens[:, 4] % 10)
    both = jax.jit(lambda t: model.apply(variables, jnp.concatenate([images, images]), t))(
        jnp.concatenate([tokens, changed])
    )
    logits = np.asarray(_logits(both))
    assert logits.shape == (6, L, V) and logits.dtype == np.float32
    a, b = logits[:3], logits[3:]
    # logits[:, t] sees tokens[:, :t + 1] only: changing token 4 leaves positions 0..3 as they were.
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)
    assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-4
    if which.startswith("sat"):
        alphas = np.asarray(both["alphas"])
        assert alphas.shape == (6, L, 16)  # 4x4 grid
        np.testing.assert_allclose(alphas.sum(-1), 1.0, atol=1e-5)
        assert (alphas >= 0).all()


def test_sat_state_init_reads_the_mean_annotation_or_the_image_vector(sat, sat_cnn):
    images = _images(2)
    # A VGG grid's image vector is its mean annotation: the two choices are one model.
    model, variables = sat
    pooled = show_attend_tell.from_config(_cfg("show_attend_tell", init_from="pooled"))
    a, b = (m.apply(variables, images, method="init_state")["h"] for m in (model, pooled))
    np.testing.assert_allclose(a, b, atol=1e-6)
    # A SmallCNN's image vector is its projection head: h0 = tanh(f_init_h(that vector)).
    model, variables = sat_cnn
    vec = model.encoder.apply({"params": variables["params"]["encoder"]}, images)
    p = variables["params"]["init_h"]
    np.testing.assert_allclose(model.apply(variables, images, method="init_state")["h"],
                               np.tanh(vec @ p["kernel"] + p["bias"]), atol=1e-5)
    with pytest.raises(ValueError, match="init_from 'max'"):
        show_attend_tell.from_config(_cfg("show_attend_tell", init_from="max")).init(
            jax.random.key(0), images, _tokens(2))


def _task_config(**kw):
    task = dict(name="caption", pad_id=0, attention_penalty=1.0, reinforce_weight=1.0, entropy_weight=0.01,
                baseline_decay=0.9)
    task.update(kw)
    return ml_collections.ConfigDict(dict(task=task))


def test_loss_masks_padding_and_adds_the_penalty(sat):
    model, variables = sat
    batch = {"image": _images(2), "tokens": _tokens(2)}
    alphas = np.random.default_rng(0).dirichlet(np.ones(5), size=(2, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
    want = [np.sum((1 - (alphas[b] * mask[b][:, None]).sum(0)) ** 2) for b in range(2)]
    np.testing.assert_allclose(caption.attention_penalty(jnp.asarray(alphas), jnp.asarray(mask)), want, rtol=1e-5)

    config = _task_config(attention_penalty=2.0)
    loss, aux, out = jax.jit(lambda p: caption.loss_fn(model, p, batch, jax.random.key(0), config, {}) + (
        model.apply({"params": p}, batch["image"], batch["tokens"]),))(variables["params"])
    m = aux["metrics"]
    assert float(m["loss_tokens"]) == 5 + 6  # row 0: four pieces and eos, then pad; row 1: six pieces
    # Per caption penalty (its mean is the metric), summed over the batch and divided by the token
    # count like the NLL: loss - nll = lambda * B * mean penalty / n_tokens.
    np.testing.assert_allclose(
        float(loss) - float(m["nll"]), 2.0 * 2 * float(m["attention_penalty"]) / 11, rtol=1e-5
    )
    # The penalty by hand from the model's alphas over the counted steps.
    steps = np.asarray(batch["tokens"][:, 1:] != 0, np.float32)
    by_hand = np.mean([np.sum((1 - (np.asarray(out["alphas"])[b, :-1] * steps[b][:, None]).sum(0)) ** 2)
                       for b in range(2)])
    np.testing.assert_allclose(float(m["attention_penalty"]), by_hand, rtol=1e-5)


def test_hard_attention_reinforce_gradients_flow():
    model = show_attend_tell.from_config(_cfg("show_attend_tell", attention="hard"))
    batch = {"image": _images(4), "tokens": _tokens(4)}
    # No penalty and no entropy bonus: the attention MLP's gradient comes from REINFORCE alone
    # (a sampled location passes no gradient to alpha through z).
    config = _task_config(attention_penalty=0.0, entropy_weight=0.0)

    @jax.jit
    def run(rng):
        variables = nn.unbox(model.init({"params": rng}, batch["image"], batch["tokens"]))
        model_state = {k: v for k, v in variables.items() if k != "params"}
        out = jax.value_and_grad(lambda p: caption.loss_fn(model, p, batch, rng, config, model_state), has_aux=True)(
            variables["params"])
        return out, model_state

    ((loss, aux), grads), model_state = run(jax.random.key(3))
    assert set(model_state) == {"reinforce"}
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    att_v = np.asarray(grads["core"]["att_v"]["kernel"])
    assert np.abs(att_v).max() > 0
    assert np.abs(np.asarray(grads["encoder"]["conv0_0"]["kernel"])).max() > 0
    new = aux["model_state"]["reinforce"]
    assert int(new["updates"]) == 1
    np.testing.assert_allclose(float(new["baseline"]), float(aux["metrics"]["reward"]), rtol=1e-5)
    assert float(aux["metrics"]["reward"]) < 0


PROMPTS = [[2], [2, 5, 9, 4], [2, 11]]


@pytest.mark.parametrize("which", ["st", "st_inject", "sat"])
def test_greedy_decoding_matches_the_teacher_forced_model(which, request):
    """generate (a padded batch of prompts of different lengths) == per row, step-by-step argmax
    of the full model on the row's own prefix: decoding is right and padding changes nothing."""
    model, variables = request.getfixturevalue(which)
    params, steps = variables["params"], 5
    images = _images(len(PROMPTS), seed=4)
    dec = decode.decoder_for(model)
    assert hash(dec) == hash(decode.decoder_for(model))
    got = decode.generate(dec, params, PROMPTS, max_new_tokens=steps, context=images, stop_tokens=(99,))
    width = max(map(len, PROMPTS)) + steps
    full = jax.jit(lambda t: _logits(model.apply({"params": params}, images, t)))
    seqs = [list(p) for p in PROMPTS]
    for _ in range(steps):
        rows = np.zeros((len(seqs), width), np.int32)
        for r, s in enumerate(seqs):
            rows[r, : len(s)] = s
        logits = np.asarray(full(jnp.asarray(rows)))
        for r, s in enumerate(seqs):
            s.append(int(np.argmax(logits[r, len(s) - 1])))
    assert got == [s[len(p):] for s, p in zip(seqs, PROMPTS)]


@pytest.mark.slow  # CI time: the greedy test above already checks the decoder against the model
def test_sat_decoder_keeps_attention_and_beam_search_runs(sat):
    model, variables = sat
    params, images = variables["params"], _images(2, seed=5)
    dec = model.make_decoder(keep_attention=8)
    tokens = jnp.asarray([[0, 0, 2], [2, 5, 6]])
    positions = jnp.asarray([[0, 0, 0], [0, 1, 2]])
    valid = tokens > 0

    @jax.jit
    def two_steps(params):
        cache = dec.init_cache(params, 2, images)
        logits, cache = dec.step(params, cache, tokens, positions, valid)
        ones = jnp.ones((2, 1), bool)
        logits2, cache = dec.step(params, cache, jnp.asarray([[7], [8]]), jnp.asarray([[1], [3]]), ones)
        return logits, logits2, cache

    logits, logits2, cache = two_steps(params)
    full = model.apply({"params": params}, images, jnp.asarray([[2, 7, 0, 0], [2, 5, 6, 8]]))
    kept = np.asarray(cache["alphas"])
    np.testing.assert_allclose(kept[0, :2], full["alphas"][0, :2], atol=1e-5)
    np.testing.assert_allclose(kept[1, :4], full["alphas"][1, :4], atol=1e-5)
    assert (kept[0, 2:] == 0).all() and (kept[1, 4:] == 0).all()
    np.testing.assert_allclose(logits[0, -1], full["logits"][0, 0], atol=1e-4)
    np.testing.assert_allclose(logits2[:, 0], full["logits"][[0, 1], [1, 3]], atol=1e-4)
    out = decode.generate_detailed(dec, params, [[2], [2, 5]], max_new_tokens=4, method="beam", beam_size=3,
                                   context=images)
    assert len(out.beams) == 2 and all(len(t) <= 4 for t in out.tokens)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["show_tell.py:tiny", "show_attend_tell.py:tiny", "show_attend_tell.py:tiny_scratch"])
def test_tiny_config_trains(spec, world_cache, tmp_path):
    from vlm_jax import config as config_lib
    from vlm_jax.train.metrics import read_metrics
    from vlm_jax.train.trainer import train

    config = config_lib.load(
        f"configs/{spec}",
        {
            "data.tfds_data_dir": str(world_cache / "tfds"),
            "data.batch_size": 32,
            "tokenizer.path": str(world_cache / "tokenizer.model"),
            "train.steps": 60,
            "optim.warmup_steps": 5,
            "train.log_every": 1,
            "train.eval_every": 0,
            "train.ckpt_every": 1000,
            "train.progress": False,
            "train.async_checkpoints": False,
        },
    )
    with config.unlocked():
        config.data.world_num_examples.update(dict(train=512, validation=64, test=64))
    # The base config alone (a staged config's caption stage, on a frozen random encoder here).
    workdir = tmp_path / spec.replace(".py:", "_")
    train(config, str(workdir))
    # The caption NLL falls (SAT's loss also holds the attention penalty, which cannot reach 0 with
    # more locations than words).
    losses = [r["train/nll"] for r in read_metrics(workdir) if "train/nll" in r]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])


def test_beam_search_finds_the_exhaustive_best_caption():
    """A wide enough beam returns the best caption of all V^n (with eos, length-penalised) ones."""
    import itertools

    vocab, steps, eos, alpha = 6, 3, 3, 0.6
    model = show_tell.from_config(_cfg("show_tell", vocab_size=vocab))
    image, bos = _images(1, seed=7), 2
    tokens = jnp.zeros((1, steps + 1), jnp.int32)
    variables = nn.unbox(jax.jit(lambda r: model.init({"params": r}, image, tokens))(jax.random.key(3)))
    params = variables["params"]
    params["out"]["kernel"] = params["out"]["kernel"] * 4.0
    candidates = [c for n in range(1, steps + 1) for c in itertools.product(range(vocab), repeat=n)
                  if eos not in c[:-1] and (n == steps or c[-1] == eos)]
    rows = np.zeros((len(candidates), steps + 1), np.int32)
    rows[:, 0] = bos
    for r, c in enumerate(candidates):
        rows[r, 1 : 1 + len(c)] = c
    images = jnp.broadcast_to(image, (len(rows),) + image.shape[1:])
    logp = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, images, jnp.asarray(rows)), axis=-1))
    scores = [sum(logp[r, j, t] for j, t in enumerate(c)) / ((5 + len(c)) / 6) ** alpha
              for r, c in enumerate(candidates)]
    best = candidates[int(np.argmax(scores))]
    out = decode.generate_detailed(
        decode.decoder_for(model), params, [[bos]], max_new_tokens=steps, method="beam",
        beam_size=vocab ** (steps - 1), stop_tokens=(eos,), length_penalty=alpha, context=image,
    )
    top = out.beams[0][0]
    assert top.tokens + ([eos] if top.stopped else []) == list(best)
    np.testing.assert_allclose(top.score, max(scores), rtol=1e-5)
