"""The unCLIP diffusion prior (models.unclip_prior, tasks.diffusion_prior, evals.prior): shapes and
scaling, the frozen CLIP (no gradient) beside the trained transformer, the pad mask and the causal
mask, the loss against a hand computation, caption dropping, guided best-of-n sampling compiled
once, clear errors for bad settings, the evaluator's metrics (closed forms, an untrained model and a
perfect "oracle" prior). configs/unclip.py:tiny's stages run in tests/models/test_unclip.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax import evals, models, tasks
from vlm_jax.evals import prior as prior_eval
from vlm_jax.models import unclip_prior
from vlm_jax.sampling import diffusion as samplers

PRIOR = tasks.get("diffusion_prior")
L = 20  # configs/clip.py:tiny's text length
# The CLIP of the staged_smoke_config fixture's CLIP stage (width 16), and a prior of width 16.
_SMALL = {
    "model.clip.embed_dim": 16, "model.clip.text.width": 16, "model.clip.text.depth": 1, "model.clip.text.heads": 2,
    "model.clip.image.channels": (8, 16, 16), "model.clip.image.pool": "mean",
    "model.width": 16, "model.depth": 2, "model.heads": 2,
}


def _with_task(config, **changes):
    """A copy of config with config.task keys changed."""
    return ml_collections.ConfigDict({**config.to_dict(), "task": {**config.task.to_dict(), **changes}})


@pytest.fixture(scope="module")
def tiny(world_cache):
    """configs/unclip.py:prior_tiny made narrow, on the small shared world, initialised once, with its
    programs jitted once for the tests below."""
    config = config_lib.load("configs/unclip.py:prior_tiny", {
        **_SMALL, "task.sample_steps": 3, "data.tfds_data_dir": str(world_cache / "tfds"),
        "tokenizer.path": str(world_cache / "tokenizer.model"), "evals.val.num_examples": 8,
        "evals.val.batch_size": 2,
    })
    with config.unlocked():
        config.data.world_num_examples.update(dict(train=256, validation=64, test=64))
    model = models.build(config)
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    tokens = jnp.array([[2, 5, 6, 3] + [0] * (L - 4), [2, 7, 3] + [0] * (L - 3)], jnp.int32)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens))
    fns = dict(
        embed=jax.jit(lambda v, im: model.apply(v, im, method=model.embed_image)),
        condition=jax.jit(lambda v, tok: model.apply(v, tok, method=model.condition)),
        sequence=jax.jit(lambda v, x, t, c: model.apply(v, x, t, c, method=model.sequence)),
        denoise=jax.jit(lambda v, x, t, c: model.apply(v, x, t, c, method=model.denoise)),
    )
    return config, model, variables, images, tokens, fns


def test_shapes_scaling_and_param_tree(tiny):
    config, model, variables, images, tokens, fns = tiny
    x0 = fns["embed"](variables, images)
    assert x0.shape == (2, 16) and x0.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(x0, axis=-1), 4.0, rtol=1e-5)  # sqrt(E): unit-variance entries
    cond = fns["condition"](variables, tokens)
    assert cond["hidden"].shape == (2, L, 16) and cond["text_embed"].shape == (2, 16)
    np.testing.assert_array_equal(cond["mask"], np.asarray(tokens) != 0)
    np.testing.assert_allclose(np.linalg.norm(cond["text_embed"], axis=-1), 4.0, rtol=1e-5)
    t = jnp.array([0, 999])
    assert fns["sequence"](variables, x0, t, cond).shape == (2, L + unclip_prior.NUM_EXTRA, 16)
    out = fns["denoise"](variables, x0, t, cond)
    assert out.shape == (2, 16) and out.dtype == jnp.float32 and np.all(np.isfinite(out))
    assert set(variables["params"]) == {"clip", "text_in", "embed_in", "x_in", "time_1", "time_2", "query",
                                        "pos_embedding", "blocks", "ln_final", "out"}
    assert {"image", "text", "text_projection", "logit_scale"} <= set(variables["params"]["clip"])
    assert variables["params"]["pos_embedding"].shape == (L + 4, 16)


def test_pad_positions_are_masked_out(tiny):
    """Whatever the pad positions' hidden states hold, the output is the same; a real token's matter."""
    _, _, variables, images, tokens, fns = tiny
    x0, cond = fns["embed"](variables, images), fns["condition"](variables, tokens)
    t = jnp.array([10, 500])
    base = fns["denoise"](variables, x0, t, cond)
    junk = 10.0 * jax.random.normal(jax.random.key(5), cond["hidden"].shape)
    pad = ~cond["mask"][..., None]
    at_pads = fns["denoise"](variables, x0, t, {**cond, "hidden": jnp.where(pad, cond["hidden"] + junk, cond["hidden"])})
    np.testing.assert_allclose(at_pads, base, atol=1e-5)
    at_real = fns["denoise"](variables, x0, t, {**cond, "hidden": jnp.where(pad, cond["hidden"], cond["hidden"] + junk)})
    assert np.abs(np.asarray(at_real) - np.asarray(base)).max() > 1e-3


def test_causal_mask_earlier_positions_do_not_see_later_inputs(tiny):
    """Sequence [text (L); text embedding; timestep; x_t; query]: changing x_t changes its own and the
    query's outputs only; changing t, the timestep's onwards."""
    _, _, variables, images, tokens, fns = tiny
    x0, cond = fns["embed"](variables, images), fns["condition"](variables, tokens)
    t = jnp.array([10, 500])
    base = np.asarray(fns["sequence"](variables, x0, t, cond))
    for changed, first in ((fns["sequence"](variables, -x0, t, cond), L + 2),
                           (fns["sequence"](variables, x0, t + 300, cond), L + 1)):
        changed = np.asarray(changed)
        np.testing.assert_allclose(changed[:, :first], base[:, :first], atol=1e-5)
        assert all(np.abs(changed[:, p] - base[:, p]).max() > 1e-4 for p in range(first, L + 4))


@pytest.fixture(scope="module")
def loss_and_grads(tiny):
    """value_and_grad of the loss at cond_drop 0, jitted once: (params, tokens) -> ((loss, aux), grads)."""
    config, model, variables, images, _, _ = tiny
    config = _with_task(config, cond_drop=0.0)

    def loss(params, tokens):
        return PRIOR.loss_fn(model, params, {"image": images, "tokens": tokens}, jax.random.key(3), config, {})

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_loss_equals_a_hand_computation_and_only_the_prior_gets_gradients(tiny, loss_and_grads):
    config, _, variables, images, tokens, fns = tiny
    (loss, aux), grads = loss_and_grads(variables["params"], tokens)
    # By hand, from the same pieces of the key: x_t in closed form from the cosine schedule's abar.
    _, r_t, r_noise, _ = jax.random.split(jax.random.key(3), 4)
    x0 = fns["embed"](variables, images)
    t = jax.random.randint(r_t, (2,), 0, 1000)
    noise = jax.random.normal(r_noise, (2, 16), jnp.float32)
    s = np.arange(1001) / 1000
    f = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    abar = np.cumprod(1 - betas)[np.asarray(t)][:, None]
    x_t = np.sqrt(abar) * np.asarray(x0) + np.sqrt(1 - abar) * np.asarray(noise)
    out = np.asarray(fns["denoise"](variables, jnp.asarray(x_t, jnp.float32), t, fns["condition"](variables, tokens)))
    np.testing.assert_allclose(loss, np.mean((out - np.asarray(x0)) ** 2), rtol=1e-4)  # x0-prediction
    cos = np.sum(out * x0, -1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(x0, axis=-1)
    metrics = aux["metrics"]
    np.testing.assert_allclose(metrics["cos"], cos.mean(), rtol=1e-4, atol=1e-6)
    assert set(metrics) == {"loss", "mse", "cos", "mse_low_t", "mse_high_t", "caption_dropped"}
    assert float(metrics["caption_dropped"]) == 0.0
    # The frozen CLIP gets no gradient at all; every tensor of the prior's network gets some.
    for path, g in jax.tree_util.tree_leaves_with_path(grads["clip"]):
        assert not np.any(np.asarray(g)), jax.tree_util.keystr(path)
    for name, tree in grads.items():
        if name != "clip":
            for path, g in jax.tree_util.tree_leaves_with_path(tree):
                assert np.any(np.asarray(g) != 0), name + jax.tree_util.keystr(path)


def test_cond_drop_rate_and_the_empty_caption(tiny, loss_and_grads):
    config, model, variables, images, tokens, _ = tiny
    rows = jnp.tile(jnp.arange(1, 6, dtype=jnp.int32), (4000, 1))
    dropped_tokens, dropped = PRIOR.drop_captions(rows, jax.random.key(0), 0.1)
    rate = float(dropped.mean())
    assert abs(rate - 0.1) < 4 * np.sqrt(0.1 * 0.9 / 4000)  # within 4 sigma of the binomial
    np.testing.assert_array_equal(np.asarray(dropped_tokens)[np.asarray(dropped)], 0)
    np.testing.assert_array_equal(np.asarray(dropped_tokens)[~np.asarray(dropped)], np.asarray(rows)[~np.asarray(dropped)])
    with pytest.raises(ValueError, match="cond_drop must lie in"):
        PRIOR.drop_captions(rows, jax.random.key(0), 1.5)
    # cond_drop 1: the loss of the empty caption (the same t and noise: the key's other pieces).
    all_dropped, aux = jax.jit(lambda p: PRIOR.loss_fn(model, p, {"image": images, "tokens": tokens},
                                                     jax.random.key(3), _with_task(config, cond_drop=1.0), {}))(
        variables["params"])
    (empty, _), _ = loss_and_grads(variables["params"], jnp.zeros_like(tokens))
    (kept, _), _ = loss_and_grads(variables["params"], tokens)
    np.testing.assert_allclose(all_dropped, empty, rtol=1e-6)
    assert float(aux["metrics"]["caption_dropped"]) == 1.0 and abs(float(all_dropped) - float(kept)) > 1e-6


def test_sampling_is_one_compiled_loop_and_keeps_the_best_of_n(tiny):
    config, model, variables, _, tokens, fns = tiny
    task = config.task  # DDIM 3 steps, guidance 2, best of 2
    before = samplers._loop._cache_size()
    first = PRIOR.sample_embeddings(model, variables, tokens, jax.random.key(0), task)
    assert first.shape == (2, 16) and np.all(np.isfinite(first))
    compiled = samplers._loop._cache_size()
    assert compiled - before <= 1  # the whole chain: one program (none when an equal model compiled it)
    again = PRIOR.sample_embeddings(model, variables, tokens[::-1], jax.random.key(0), task)
    cands = PRIOR.candidates(model, variables, tokens, jax.random.key(0), task)
    swapped = PRIOR.candidates(model, variables, tokens[::-1], jax.random.key(0), task)
    assert samplers._loop._cache_size() == compiled  # new captions, the candidates alone: no new compile
    assert again.shape == (2, 16)
    assert np.abs(np.asarray(swapped) - np.asarray(cands)).max() > 1e-4  # the same noise: the captions matter
    # The kept one is the candidate with the largest dot product with the caption's text embedding.
    assert cands.shape == (2, 2, 16)
    text = np.asarray(fns["condition"](variables, tokens)["text_embed"])
    best = np.argmax(np.einsum("bne,be->bn", np.asarray(cands), text), axis=1)
    np.testing.assert_allclose(first, np.asarray(cands)[np.arange(2), best], rtol=1e-5, atol=1e-6)
    picked, choice = PRIOR.pick_best(jnp.array([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 1.0]]]),
                                     jnp.array([[0.0, 1.0], [1.0, 1.0]]))
    np.testing.assert_array_equal(choice, [1, 0])
    np.testing.assert_array_equal(picked, [[0.0, 1.0], [3.0, 0.0]])


@pytest.mark.parametrize("key, value, match", [
    ("guidance", -1.0, "guidance scale must be >= 0"),
    ("sample_steps", 0, "sample_steps >= 1"),
    ("sampler", "euler", "task.sampler 'euler'"),
    ("best_of", 0, "best_of must be >= 1"),
    ("prediction", "x0", "unknown prediction type"),
    ("eta", -0.5, "eta must be >= 0"),
])
def test_bad_sampling_settings_are_clear_errors(tiny, key, value, match):
    config, model, variables, _, tokens, _ = tiny
    with pytest.raises(ValueError, match=match):
        PRIOR.sample_embeddings(model, variables, tokens, jax.random.key(0), _with_task(config, **{key: value}).task)


def test_bad_model_settings_are_clear_errors(tiny):
    config = tiny[0]
    with pytest.raises(ValueError, match="model.clip"):
        unclip_prior.from_config(ml_collections.ConfigDict(dict(name="unclip_prior", width=16)))
    bad = ml_collections.ConfigDict({**config.model.to_dict(), "heads": 3})
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        unclip_prior.from_config(bad)


def test_prior_metrics_closed_forms():
    image = np.eye(3, 4) * 2.0  # three orthogonal images (any scale)
    text = image + np.array([0.0, 0.0, 0.0, 1.0])  # caption i: cosine 2 / sqrt(5) with image i, 0 with the others
    held = np.array([True, False, False])
    m = prior_eval.prior_metrics(image * 5.0, image, text, held)  # a perfect prior
    assert m["prior/cos_image"] == pytest.approx(1.0) and m["prior/retrieval_top1"] == 1.0
    assert m["prior/shuffled/cos_image"] == pytest.approx(0.0)  # the next caption's image: orthogonal
    assert m["prior/cos_text"] == pytest.approx(m["prior/real/cos_text"]) == pytest.approx(2 / np.sqrt(5))
    assert m["prior/text/retrieval_top1"] == 1.0
    m = prior_eval.prior_metrics(np.roll(image, 1, axis=0), image, text, held)  # every sample the wrong image
    assert m["prior/retrieval_top1"] == 0.0 and m["prior/cos_image"] == pytest.approx(0.0)
    assert m["prior/cos_image_heldout"] == pytest.approx(0.0) and m["prior/retrieval_top1_seen"] == 0.0
    assert "prior/cos_image_heldout" in m and "prior/cos_image_seen" in m
    with pytest.raises(ValueError, match="P >= 2"):
        prior_eval.prior_metrics(image[:1], image[:1], text[:1])


def test_evaluator_on_an_untrained_prior_and_an_oracle(tiny, world_cache):
    from vlm_jax.data.tokenizer import Tokenizer

    config, model, variables, _, _, _ = tiny
    tokenizer = Tokenizer.load(str(world_cache / "tokenizer.model"))
    (evaluator,) = evals.build(config, model, tokenizer, None)  # config.evals.val: kind prior
    assert isinstance(evaluator, prior_eval.PriorEvaluator) and evaluator.tokens.shape == (8, L)
    metrics = evaluator(variables["params"], {})
    names = ("cos_image", "cos_text", "real/cos_text", "shuffled/cos_image", "retrieval_top1", "text/retrieval_top1")
    for name in names:
        value = metrics[f"val/prior/{name}"]
        assert (0.0 <= value <= 1.0) if "retrieval" in name else (-1.0 - 1e-6 <= value <= 1.0 + 1e-6), (name, value)
    assert any(k.endswith("_heldout") for k in metrics) == bool(evaluator.held_out.any())
    # A prior that returns the true image's embedding: cos_image 1 above the shuffled floor, the
    # true image retrieved every time, cos_text at the real ceiling.
    evaluator.sample = lambda v: evaluator.embed(v)[0]
    oracle = evaluator(variables["params"], {})
    assert oracle["val/prior/cos_image"] == pytest.approx(1.0, abs=1e-5)
    assert oracle["val/prior/cos_image"] > oracle["val/prior/shuffled/cos_image"]
    assert oracle["val/prior/retrieval_top1"] == 1.0
    assert oracle["val/prior/cos_text"] == pytest.approx(oracle["val/prior/real/cos_text"], abs=1e-5)
    assert oracle["val/prior/real/cos_text"] == pytest.approx(metrics["val/prior/real/cos_text"], abs=1e-5)
