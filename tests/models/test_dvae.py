"""models.dvae: the DALL-E discrete VAE and its VQ-VAE variant (shapes, round trips, axes, errors)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax import models
from vlm_jax.models import dvae


def _model(kind="dvae", **kw):
    cfg = dict(name="dvae", kind=kind, num_codes=16, hidden=8, channel_mults=(1, 2), blocks_per_group=1,
               embed_dim=8, input_kernel=3)
    if kind == "vqvae":
        cfg["vq"] = dict(ema=True, dead_code_threshold=0.5)
    cfg.update(kw)
    return models.build(ml_collections.ConfigDict(cfg))


def _images(n=2, size=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


@functools.cache
def _variables(kind):
    model = _model(kind)
    boxed = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0, impl="rbg"), _images())
    return model, nn.meta.unbox(boxed)


@pytest.mark.parametrize("kind", ["dvae", "vqvae"])
def test_forward_shapes_and_round_trip(kind):
    model, variables = _variables(kind)
    images = _images()
    out = jax.jit(model.apply)(variables, images)
    assert out["reconstruction"].shape == (2, 8, 8, 3) and out["reconstruction"].dtype == jnp.float32
    assert out["codes"].shape == (2, 4, 4) and out["codes"].dtype == jnp.int32
    if kind == "dvae":
        assert out["logits"].shape == (2, 4, 4, 16)
    else:
        assert {"commitment_loss", "codebook_loss", "vq_loss", "restarted"} <= set(out)
    assert 1.0 <= float(out["perplexity"]) <= 16.0 and 0 <= float(out["dead_codes"]) <= 15

    codes = jax.jit(functools.partial(model.apply, method="encode_codes"))(variables, images)
    assert codes.shape == (2, 4, 4) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    np.testing.assert_array_equal(codes, out["codes"])
    decoded = jax.jit(functools.partial(model.apply, method="decode_codes"))(variables, codes)
    assert decoded.shape == (2, 8, 8, 3) and decoded.dtype == jnp.float32
    # Evaluation mode decodes the hard codes: the forward pass's reconstruction is exactly that.
    np.testing.assert_allclose(decoded, out["reconstruction"], rtol=1e-5, atol=1e-5)


def test_gumbel_softmax_is_a_relaxed_one_hot_that_hardens_with_temperature():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(512, 8)), jnp.float32)
    rng = jax.random.key(1, impl="rbg")
    warm, cold = dvae.gumbel_softmax(rng, logits, 1.0), dvae.gumbel_softmax(rng, logits, 1.0 / 16)
    np.testing.assert_allclose(np.sum(warm, -1), 1.0, rtol=1e-5)
    assert float(jnp.mean(jnp.max(cold, -1))) > 0.95 > float(jnp.mean(jnp.max(warm, -1)))
    # Same noise: the cold sample's argmax is the warm one's; samples follow softmax(logits).
    np.testing.assert_array_equal(jnp.argmax(warm, -1), jnp.argmax(cold, -1))
    many = dvae.gumbel_softmax(rng, jnp.broadcast_to(logits[0], (20000, 8)), 1.0 / 16)
    freq = np.bincount(np.asarray(jnp.argmax(many, -1)), minlength=8) / 20000
    np.testing.assert_allclose(freq, jax.nn.softmax(logits[0]), atol=0.02)


def test_straight_through_decodes_the_hard_sample_with_the_soft_gradient():
    model, variables = _variables("dvae")
    images, key = _images(), jax.random.key(3, impl="rbg")

    def recon(params, straight_through, temperature):
        out = model.apply({"params": params}, images, train=True, temperature=temperature,
                          straight_through=straight_through, rngs={"dropout": key})
        return out["reconstruction"]

    run = jax.jit(recon, static_argnums=1)
    # A cold sample is one-hot already: both ways decode the same codes. A warm one is a mixture,
    # which the straight-through forward replaces by its argmax.
    np.testing.assert_allclose(run(variables["params"], True, 1e-4), run(variables["params"], False, 1e-4),
                               rtol=1e-4, atol=1e-4)
    assert not np.allclose(run(variables["params"], True, 0.5), run(variables["params"], False, 0.5), atol=1e-3)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(recon(p, True, 0.5))))(variables["params"])
    assert float(jnp.abs(grad["encoder"]["codebook_logits"]["kernel"]).sum()) > 0


def test_code_statistics():
    stats = dvae.code_statistics(jnp.asarray([[0, 0], [1, 1]]), 4)
    np.testing.assert_allclose(float(stats["perplexity"]), 2.0, rtol=1e-6)
    assert float(stats["dead_codes"]) == 2.0


@pytest.mark.parametrize("kind", ["dvae", "vqvae"])
def test_every_param_has_logical_axes(kind):
    model = _model(kind, vq=dict(ema=False)) if kind == "vqvae" else _model(kind)
    boxed = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0, impl="rbg"), _images())
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    names = {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in
             jax.tree_util.tree_flatten_with_path(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]}
    # The codebook is named as such (a checkpoint of another size says which array differs).
    assert any("codebook" in n for n in names)


def test_bad_input_is_a_clear_error():
    model, variables = _variables("dvae")
    with pytest.raises(ValueError, match="divisible by 2"):
        model.apply(variables, _images(size=7))
    with pytest.raises(ValueError, match=r"\[B, S, S, 3\]"):
        model.apply(variables, jnp.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="int codes"):
        model.apply(variables, jnp.zeros((2, 4, 4), jnp.float32), method="decode_codes")
    with pytest.raises(ValueError, match="kind 'vq'"):
        _model("vq").init(jax.random.key(0), _images())
