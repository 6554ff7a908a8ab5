"""models.autoencoder_kl: shapes, the reparameterised sample, KL, logical axes, config errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax import models
from vlm_jax.models import autoencoder_kl
from vlm_jax.models.diffusion import blocks

TINY = dict(name="autoencoder_kl", block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
            latent_channels=3)


def _model(**kw):
    return models.build(ml_collections.ConfigDict({**TINY, **kw}))


def _images(n=2, size=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, size=(n, size, size, 3)), jnp.float32)


@functools.cache
def _variables():
    model = _model()
    return model, jax.jit(model.init)(jax.random.key(0), _images())


def test_shapes_and_downsampling_factor():
    model, boxed = _variables()
    variables = nn.unbox(boxed)
    assert model.downsample_factor == 4 and model.scaling_factor == pytest.approx(0.18215)
    out = jax.jit(model.apply)(variables, _images())
    assert out["mean"].shape == out["logvar"].shape == out["z"].shape == (2, 4, 4, 3)
    assert out["kl"].shape == (2,) and out["reconstruction"].shape == (2, 16, 16, 3)
    assert all(v.dtype == jnp.float32 for v in out.values())
    np.testing.assert_array_equal(out["z"], out["mean"])  # evaluation: the mean
    mean, logvar = jax.jit(functools.partial(model.apply, method="encode"))(variables, _images())
    np.testing.assert_allclose(mean, out["mean"], atol=1e-6)
    assert float(logvar.min()) >= -30.0 and float(logvar.max()) <= 20.0
    image = jax.jit(functools.partial(model.apply, method="decode"))(variables, jnp.zeros((1, 3, 5, 3)))
    assert image.shape == (1, 12, 20, 3)


def test_reparameterised_sample_uses_the_rng():
    model, boxed = _variables()
    variables = nn.unbox(boxed)
    run = jax.jit(lambda v, x, r: model.apply(v, x, train=True, rngs={"dropout": r}))
    a, b = run(variables, _images(), jax.random.key(1)), run(variables, _images(), jax.random.key(2))
    again = run(variables, _images(), jax.random.key(1))
    np.testing.assert_array_equal(a["z"], again["z"])
    assert not np.allclose(a["z"], b["z"]) and not np.allclose(a["z"], a["mean"])
    std = (a["z"] - a["mean"]) / jnp.exp(0.5 * a["logvar"])  # the standard-normal noise
    assert abs(float(std.mean())) < 0.3 and 0.6 < float(std.std()) < 1.4
    explicit = jax.jit(model.apply)(variables, _images(), sample_rng=jax.random.key(1))  # eval mode, own rng
    assert not np.allclose(explicit["z"], explicit["mean"])


def test_kl():
    zeros = jnp.zeros((2, 4, 4, 3))
    np.testing.assert_array_equal(autoencoder_kl.kl(zeros, zeros), [0.0, 0.0])
    mean = jnp.ones((1, 2, 2, 1))
    logvar = jnp.full((1, 2, 2, 1), jnp.log(2.0))
    # per entry 0.5 * (1 + 2 - 1 - log 2), four entries
    np.testing.assert_allclose(autoencoder_kl.AutoencoderKL.kl(mean, logvar), [2.0 * (2 - np.log(2.0))], rtol=1e-6)


def test_every_param_has_logical_axes_and_is_float32():
    _, boxed = _variables()
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim and x.value.dtype == jnp.float32 for x in leaves)
    params = nn.unbox(boxed)["params"]
    assert params["encoder"]["down_blocks_0"]["downsample"]["kernel"].shape == (3, 3, 8, 8)
    assert "downsample" not in params["encoder"]["down_blocks_2"]
    assert params["encoder"]["mid_block"]["attentions_0"]["attention"]["query"]["kernel"].shape == (16, 1, 16)
    assert len(params["decoder"]["up_blocks_0"]) == 3  # layers_per_block + 1 resnets and the upsample


def test_downsample_pads_bottom_right_like_diffusers():
    # A 1-channel stride-2 conv whose kernel picks its bottom-right tap: with (0, 1) padding an
    # output reads input (2i + 2, 2j + 2), zero past the edge.
    settings = autoencoder_kl.block_settings(groups=1)

    class Down(nn.Module):
        @nn.compact
        def __call__(self, x):
            return blocks.downsample(x, settings, "d")

    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    kernel = jnp.zeros((3, 3, 1, 1)).at[2, 2].set(1.0)
    y = Down().apply({"params": {"d": {"kernel": kernel, "bias": jnp.zeros(1)}}}, x)
    np.testing.assert_array_equal(y[0, :, :, 0], [[10.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(down_block_types=("AttnDownEncoderBlock2D",) * 3), "down_block_types"),
        (dict(up_block_types=("UpDecoderBlock2D",)), "up_block_types"),
        (dict(norm_num_groups=3), "norm_num_groups 3"),
        (dict(layers_per_block=0), "layers_per_block"),
    ],
)
def test_bad_configs_are_clear_errors(change, match):
    with pytest.raises(ValueError, match=match):
        _model(**change)


def test_bad_inputs_are_clear_errors():
    model, boxed = _variables()
    with pytest.raises(ValueError, match="divisible by 4"):
        model.apply(nn.unbox(boxed), jnp.zeros((1, 10, 10, 3)), method="encode")
