"""Convolutional towers: CLIP's ModifiedResNet (BatchNorm state) and the small CNN."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.layers import conv
from vlm_jax.models import resnet


def _key(seed=0):
    # rbg keys: threefry's random bits take XLA:CPU seconds to compile, most of an init's cost.
    return jax.random.key(seed, impl="rbg")


@functools.cache
def _jit_apply(module):
    return jax.jit(module.apply, static_argnames=("method", "train", "mutable"))


def _apply(module, variables, *args, **kwargs):
    # Compiled once per module: eager flax compiles op by op, which is slower on a small CPU.
    return _jit_apply(module)(variables, *args, **kwargs)


def _images(b=2, size=32):
    return jnp.asarray(np.random.default_rng(0).normal(size=(b, size, size, 3)), jnp.float32)


def test_modified_resnet_shapes_and_batch_stats():
    cfg = ml_collections.ConfigDict(dict(kind="resnet", layers=(1, 2), width=8, heads=2))
    model = resnet.from_config(cfg, output_dim=12)
    x = _images(2, 16)  # stem /4, layer2 /2: a 2x2 map
    variables = jax.jit(model.init)(_key(0), x)
    assert set(variables) == {"params", "batch_stats"}
    params = nn.unbox(variables["params"])
    # Stem widths, stride by avg pool (1x1 convs), 4x expansion, attention pool over 2x2 + mean.
    assert params["stem_conv1"]["kernel"].shape == (3, 3, 3, 4)
    assert params["layer2_0"]["conv3"]["kernel"].shape == (1, 1, 16, 64)
    assert params["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 32, 64)
    assert "downsample_conv" not in params["layer2_1"]
    assert params["attnpool"]["pos_embedding"].shape == (5, 64)
    assert params["attnpool"]["attn"]["out"]["kernel"].shape == (2, 32, 12)
    out = _apply(model, variables, x)
    assert out.shape == (2, 12) and out.dtype == jnp.float32
    out_train, state = _apply(model, variables, x, train=True, mutable=("batch_stats",))
    before = variables["batch_stats"]["stem_bn1"]["mean"]
    assert not np.allclose(state["batch_stats"]["stem_bn1"]["mean"], before)
    assert out_train.shape == (2, 12)


def test_small_cnn_has_no_state_and_is_small():
    model = resnet.from_config(
        ml_collections.ConfigDict(dict(kind="cnn", channels=(8, 16))), output_dim=10
    )
    x = _images(3, 16)
    variables = jax.jit(model.init)(_key(0), x)
    assert set(variables) == {"params"}
    assert _apply(model, variables, x, train=True).shape == (3, 10)
    nonorm = resnet.SmallCNN(channels=(8, 16), output_dim=10, norm="none")
    assert "bias" in nn.unbox(jax.jit(nonorm.init)(_key(0), x))["params"]["conv0"]


def test_conv_params_have_logical_names():
    model = resnet.ModifiedResNet(layers=(1, 1, 1, 1), width=8, heads=2, output_dim=4)
    boxed = jax.eval_shape(model.init, _key(0), _images(1, 32))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(p, nn.Partitioned) for p in leaves)
    assert tuple(nn.get_partition_spec(boxed)["stem_conv1"]["kernel"]) == (
        None,
        None,
        "conv_in",
        "conv_out",
    )


def test_small_cnn_flatten_head_keeps_the_grid():
    x = _images(2, 16)
    flat = resnet.SmallCNN(channels=(8, 16), output_dim=10, pool="flatten")
    params = nn.unbox(jax.jit(flat.init)(_key(0), x))["params"]
    # 16x16 input, two 2x downsamplings: a 4x4 grid of 16 channels feeds the projection.
    assert params["proj"]["kernel"].shape == (4 * 4 * 16, 10)
    pooled = _apply(flat, {"params": params}, x)
    assert pooled.shape == (2, 10)
    # encode's grid is the last stage before its pool (8x8x16 here): pooling it and projecting
    # gives the pooled output, so the grid is what the head reads, not a side branch.
    out = _apply(flat, {"params": params}, x, method="encode")
    assert out["grid"].shape == (2, 8, 8, 16) and (np.asarray(out["grid"]) >= 0).all()
    np.testing.assert_array_equal(out["pooled"], pooled)
    again = resnet._max_pool_2x2(out["grid"]).reshape(2, -1) @ params["proj"]["kernel"] + params["proj"]["bias"]
    np.testing.assert_allclose(again, pooled, atol=1e-5)
    second = _apply(resnet.SmallCNN(channels=(8, 16), output_dim=10, pool="flatten", grid_stage=0),
                    {"params": params}, x, method="encode")
    assert second["grid"].shape == (2, 16, 16, 8)  # stage 0 before its pool
    with np.testing.assert_raises_regex(ValueError, "grid_stage 2 is not one of its 2 stages"):
        _apply(resnet.SmallCNN(channels=(8, 16), output_dim=10, grid_stage=2), {"params": params}, x)
    bad = resnet.SmallCNN(channels=(8,), output_dim=10, pool="max")
    with np.testing.assert_raises_regex(ValueError, "choose mean or flatten"):
        jax.jit(bad.init)(_key(0), x)


def test_small_cnn_pool_matches_flax_max_pool_and_rejects_odd_sides():
    x = _images(2, 8)
    y = resnet._max_pool_2x2(x)
    np.testing.assert_array_equal(y, nn.max_pool(x, (2, 2), strides=(2, 2)))
    # The gradient goes to one element of each window: the max, or one of tied maxima (a max
    # reduction's g / count would be 0 / 0 when the compiler rounds x differently for the count).
    grad = jax.grad(lambda x: jnp.sum(resnet._max_pool_2x2(x)))(x)
    np.testing.assert_array_equal(grad, (x == jnp.repeat(jnp.repeat(y, 2, 1), 2, 2)).astype(jnp.float32))
    tied = jax.grad(lambda x: jnp.sum(resnet._max_pool_2x2(x)))(jnp.ones((1, 4, 4, 1)))
    np.testing.assert_array_equal(tied.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4).sum(1), [1, 1, 1, 1])
    model = resnet.SmallCNN(channels=(8, 16), output_dim=10)
    with np.testing.assert_raises_regex(ValueError, "divisible by 4"):
        jax.jit(model.init)(_key(0), _images(1, 10))


def test_conv3x3_matmul_weight_gradient_matches_xla(monkeypatch):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 6, 5, 4)), jnp.float32)
    plain = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(conv.conv3x3(x, w), plain(x, w), atol=1e-5)
    want = jax.vjp(plain, x, w)[1](g)
    got = jax.vjp(conv.conv3x3, x, w)[1](g)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # The SmallCNN's convs take that path; the ResNet's (strided, 1x1, 7x7 ...) keep XLA's.
    calls = []
    monkeypatch.setattr(conv, "conv3x3", lambda x, w: calls.append(w.shape) or plain(x, w))
    model = resnet.SmallCNN(channels=(4, 8), output_dim=3)
    jax.eval_shape(model.init, _key(0), x[:, :4, :4])
    assert calls == [(3, 3, 3, 4), (3, 3, 4, 8)]
    calls.clear()
    jax.eval_shape(resnet.ModifiedResNet(layers=(1, 1, 1, 1), width=8, heads=2, output_dim=4).init,
                   _key(0), _images(1, 32))
    assert calls == []
