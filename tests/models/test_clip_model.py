"""CLIP: embeddings, temperature, sigmoid bias, towers, scan/remat equivalence, dtype, sharding."""

import copy
import functools
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax import models
from vlm_jax.config_defaults import DEFAULT_RULES
from vlm_jax.layers.transformer import stack_layers

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "clip.py")
LOGICAL = {name for name, _ in DEFAULT_RULES}
EOS = 3
NOT_DECAYED = ("bias", "scale", "pos_embedding", "cls_token", "logit_scale", "logit_bias")


def _key(seed=0):
    # rbg keys: threefry's random bits take XLA:CPU seconds to compile, most of an init's cost.
    return jax.random.key(seed, impl="rbg")


@functools.cache
def _jit_apply(module):
    return jax.jit(module.apply, static_argnames=("method", "train", "mutable"))


def _apply(module, variables, *args, **kwargs):
    # Compiled once per module: eager flax compiles op by op, which is slower on a small CPU.
    return _jit_apply(module)(variables, *args, **kwargs)


def _config(kind="cnn", **model_overrides):
    config = config_lib.load(f"{CONFIG}:tiny")
    with config.unlocked():
        m = config.model
        m.text.update(context_length=8, width=16, depth=2, heads=2)
        m.embed_dim = 12
        if kind == "vit":
            m.image = dict(
                kind="vit",
                image_size=16,
                patch_size=4,
                width=16,
                depth=2,
                heads=2,
                mlp_ratio=2.0,
                pool="cls",
                pre_norm=True,
                act="quick_gelu",
                ln_eps=1e-5,
                patch_bias=False,
            )
        elif kind == "resnet":
            m.image = dict(kind="resnet", layers=(1, 1), width=8, heads=2, image_size=16)
        else:
            m.image.channels = (8, 16)
        m.update(model_overrides)
    return config


def _inputs(config, b=3):
    size = config.model.image.get("image_size", 32)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(b, size, size, 3)), jnp.float32)
    tokens = (
        jnp.asarray(np.random.default_rng(2).integers(4, 20, (b, 8)), jnp.int32).at[:, 5].set(EOS)
    )
    return images, tokens


@functools.lru_cache(maxsize=None)
def _init_cached(kind, overrides):
    config = _config(kind, **dict(overrides))
    model = models.build(config)
    images, tokens = _inputs(config)
    return model, jax.jit(model.init)(_key(0), images, tokens), images, tokens


def _init(kind="cnn", **overrides):
    # Initialising is most of the cost of these tests (op compilation), so each tower is built once.
    return _init_cached(kind, tuple(sorted(overrides.items())))


@pytest.mark.parametrize("kind", ["cnn", "vit", "resnet"])
def test_outputs_normalised_and_temperature(kind):
    model, variables, images, tokens = _init(kind)
    out = _apply(model, variables, images, tokens)
    for key in ("image_embeds", "text_embeds"):
        assert out[key].shape == (3, 12) and out[key].dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, rtol=1e-5)
    assert float(out["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-5)
    assert float(out["logit_bias"]) == 0.0
    assert "logit_bias" not in variables["params"]
    if kind == "vit":  # encode_* are the same code for every tower; compiling them once is enough
        img = _apply(model, variables, images, method="encode_image")
        txt = _apply(model, variables, tokens, method="encode_text")
        for feats, key in ((img, "image_embeds"), (txt, "text_embeds")):
            unit = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
            np.testing.assert_allclose(unit, out[key], atol=1e-5)


def test_logit_scale_is_clipped():
    model, variables, images, tokens = _init()
    params = nn.unbox(variables)["params"]
    params["logit_scale"] = jnp.asarray(10.0)
    out = _apply(model, {"params": params}, images, tokens)
    assert float(out["logit_scale"]) == pytest.approx(100.0, rel=1e-5)


def test_sigmoid_variant_has_a_bias():
    model, variables, images, tokens = _init()
    sigmoid = models.build(
        _config(loss="sigmoid", logit_scale_init=math.log(10.0), logit_bias_init=-10.0)
    )
    init = nn.unbox(jax.jit(sigmoid.init)(_key(0), images, tokens))["params"]
    assert float(init["logit_bias"]) == -10.0
    assert float(init["logit_scale"]) == pytest.approx(math.log(10.0))
    params = {**nn.unbox(variables)["params"], "logit_bias": jnp.asarray(-3.0)}
    out = _apply(sigmoid, {"params": params}, images, tokens)
    assert float(out["logit_bias"]) == -3.0


def test_text_features_at_first_eos():
    model, variables, images, tokens = _init()
    later = tokens.at[:, 6:].set(7)  # everything after the eos
    txt = _apply(model, variables, tokens, method="encode_text")
    np.testing.assert_allclose(
        _apply(model, variables, later, method="encode_text"), txt, atol=1e-6
    )
    earlier = tokens.at[:, 1].set(19)
    assert not np.allclose(_apply(model, variables, earlier, method="encode_text"), txt)


def test_scan_and_remat_match_the_loop():
    config = _config("vit")
    model, variables, images, tokens = _init("vit")
    want = _apply(model, variables, images, tokens)
    scanned_cfg = copy.deepcopy(config)
    scanned_cfg.model.scan_layers = True
    scanned_cfg.model.remat = "full"
    params = stack_layers(nn.unbox(variables)["params"])
    got = _apply(models.build(scanned_cfg), {"params": params}, images, tokens)
    for key in ("image_embeds", "text_embeds"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-5)


def test_bf16_compute_f32_params_and_outputs():
    model, variables, images, tokens = _init()
    want = _apply(model, variables, images, tokens)
    bf16 = models.build(_config(dtype="bfloat16"))
    assert all(
        p.dtype == jnp.float32
        for p in jax.tree.leaves(jax.eval_shape(bf16.init, _key(0), images, tokens))
    )
    out = _apply(bf16, variables, images, tokens)  # the same float32 params, bf16 compute
    for key in ("image_embeds", "text_embeds"):
        assert out[key].dtype == jnp.float32
        np.testing.assert_allclose(out[key], want[key], atol=0.05)


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_params_named_for_sharding_and_decay(kind):
    config = _config(kind, loss="sigmoid")
    model = models.build(config)
    boxed = jax.eval_shape(model.init, _key(0), *_inputs(config))["params"]
    flat = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    for path, leaf in flat:
        name = path[-1].key
        assert isinstance(leaf, nn.Partitioned), name
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) - {None} <= LOGICAL
        # The optimiser decays exactly `kernel` / `embedding`; everything else must be a known
        # non-decayed kind.
        if name in ("kernel", "embedding"):
            assert leaf.value.ndim >= 2, jax.tree_util.keystr(path)
        else:
            assert name in NOT_DECAYED, jax.tree_util.keystr(path)
    nn.logical_to_mesh(nn.get_partition_spec(boxed), [tuple(r) for r in DEFAULT_RULES])


def test_published_configs_build():
    for variant in ("rn50", "b16"):
        config = config_lib.load(f"{CONFIG}:{variant}")
        model = models.build(config)
        shapes = jax.eval_shape(
            model.init, _key(0), jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 77), jnp.int32)
        )
        count = sum(np.prod(p.shape) for p in jax.tree.leaves(nn.unbox(shapes)["params"]))
        # open_clip: RN50 102.0M, ViT-B/16 149.6M parameters.
        assert count / 1e6 == pytest.approx({"rn50": 102.0, "b16": 149.6}[variant], rel=0.01)
