"""ViT: shapes, pooling, heads, dtype, logical sharding names, the config variants."""

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax import models
from vlm_jax.config_defaults import DEFAULT_RULES
from vlm_jax.models.vit import ViT


def _key(seed=0):
    # rbg keys: threefry's random bits take XLA:CPU seconds to compile, most of an init's cost.
    return jax.random.key(seed, impl="rbg")


CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "vit.py")
LOGICAL = {name for name, _ in DEFAULT_RULES}


@functools.cache
def _jit_apply(module):
    return jax.jit(module.apply, static_argnames=("method", "train", "mutable"))


def _apply(module, variables, *args, **kwargs):
    # Compiled once per module: eager flax compiles op by op, which is slower on a small CPU.
    return _jit_apply(module)(variables, *args, **kwargs)


def _small(**kw):
    base = dict(image_size=16, patch_size=4, width=16, depth=2, heads=2, mlp_dim=32)
    return ViT(**{**base, **kw})


def _images(b=2, size=16):
    return jnp.asarray(np.random.default_rng(0).normal(size=(b, size, size, 3)), jnp.float32)


def test_tiny_config_builds_a_classifier():
    config = config_lib.load(f"{CONFIG}:tiny")
    model = models.build(config)
    x = _images(2, 32)
    variables = jax.jit(model.init)(_key(0), x)
    logits = _apply(model, variables, x, train=True)
    assert logits.shape == (2, 48) and logits.dtype == jnp.float32
    assert set(variables) == {"params"}
    assert models.build(config.model).num_classes == 48  # a model section works too


@pytest.mark.parametrize("pool,class_token,head", [("cls", True, True), ("gap", False, False)])
def test_pooling_encode_and_head(pool, class_token, head):
    kw = dict(representation_size=12, num_classes=5) if head else {}
    model = _small(pool=pool, class_token=class_token, **kw)
    x = _images()
    variables = jax.jit(model.init)(_key(0), x)
    out = _apply(model, variables, x, method="encode")
    assert out["hidden"].shape == (2, 16 + class_token, 16)
    assert out["pooled"].shape == (2, 16)
    tokens = out["hidden"][:, int(class_token) :]
    want = out["hidden"][:, 0] if pool == "cls" else tokens.mean(1)
    np.testing.assert_allclose(out["pooled"], want, atol=1e-6)
    result = _apply(model, variables, x)
    if head:
        assert out["pre_logits"].shape == (2, 12) and np.all(np.abs(out["pre_logits"]) <= 1)  # tanh
        np.testing.assert_allclose(result, np.zeros((2, 5)))  # zero-init head: uniform predictions
    else:  # no head: __call__ returns the pooled features
        np.testing.assert_allclose(result, out["pooled"], atol=1e-6)


def test_cls_pool_needs_class_token():
    with pytest.raises(ValueError, match="class_token"):
        jax.jit(_small(pool="cls", class_token=False).init)(_key(0), _images())


def test_every_param_has_logical_names():
    model = _small(num_classes=3, representation_size=8, pre_norm=True)
    boxed = jax.eval_shape(model.init, _key(0), _images())["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(p, nn.Partitioned) for p in leaves)
    for p in leaves:
        assert len(p.names) == p.value.ndim and set(p.names) - {None} <= LOGICAL
    # Resolvable to mesh axes under the default rules.
    nn.logical_to_mesh(nn.get_partition_spec(boxed), [tuple(r) for r in DEFAULT_RULES])


@pytest.mark.parametrize("variant,backbone_m", [("b16", 86), ("l16", 304), ("h14", 632)])
def test_published_variants_shapes(variant, backbone_m):
    config = config_lib.load(f"{CONFIG}:{variant}")
    assert config.task.name == "classification" and config.evals.val.kinds == ("accuracy",)
    model = models.build(config)
    shapes = jax.eval_shape(model.init, _key(0), jnp.zeros((1, 224, 224, 3)))
    params = nn.unbox(shapes)["params"]
    assert params["head"]["kernel"].shape[-1] == 21843
    backbone = {k: v for k, v in params.items() if k not in ("head", "pre_logits")}
    count = sum(np.prod(p.shape) for p in jax.tree.leaves(backbone))
    assert count / 1e6 == pytest.approx(backbone_m, rel=0.01)  # the paper's parameter counts
    spec = nn.get_partition_spec(shapes)["params"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"]
    assert tuple(spec) == ("layers", "embed", "mlp")
