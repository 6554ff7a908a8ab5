"""LLaMA decoder: shapes, GQA, causality, KV-cache decoding, scan vs loop, published sizes."""

import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import models
from vlm_jax.layers.embeddings import rope
from vlm_jax.layers.norms import RMSNorm
from vlm_jax.layers.transformer import stack_layers
from vlm_jax.models import llama

_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "llama.py"


def _get_config(arg):
    spec = importlib.util.spec_from_file_location("llama_config", _CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _small(**kw):
    args = dict(vocab_size=61, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=48, max_len=24)
    args.update(kw)
    return llama.Llama(**args)


@pytest.fixture(scope="module")
def small():
    model = _small()
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 61)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]
    return model, params, tokens


def test_build_and_shapes(small):
    model, params, tokens = small
    config = _get_config("tiny")
    assert config.model.name == "llama" and config.task.name == "lm"
    assert isinstance(models.build(config), llama.Llama)
    logits = model.apply({"params": params}, tokens)
    assert logits.shape == (2, 10, 61) and logits.dtype == jnp.float32
    attn = params["layers_0"]["attn"]
    assert attn["query"]["kernel"].shape == (32, 4, 8)
    assert attn["key"]["kernel"].shape == (32, 2, 8)  # grouped-query: 2 kv heads
    assert attn["out"]["kernel"].shape == (4, 8, 32)
    assert params["lm_head"]["kernel"].shape == (32, 61)


def test_param_axis_names():
    boxed = jax.eval_shape(lambda: _small().init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    specs = jax.tree.leaves(nn.get_partition_spec(boxed["params"]), is_leaf=lambda x: x is None)
    names = {n for s in specs for n in s}
    assert {"embed", "mlp", "heads", "kv_heads", "kv", "vocab"} <= names


def test_tied_embeddings():
    model = _small(tie_embeddings=True)
    tokens = jnp.arange(6)[None]
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]
    assert "lm_head" not in params
    assert jax.jit(model.apply)({"params": params}, tokens).shape == (1, 6, 61)


def test_causal(small):
    model, params, tokens = small
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 61)
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_kv_cache_decode_matches_full_forward(small):
    model, params, tokens = small
    full = model.apply({"params": params}, tokens)
    step = jax.jit(
        lambda cache, tok: model.apply({"params": params, "cache": cache}, tok, decode=True, mutable=["cache"])
    )
    # Prefill 4 tokens in one call, then one token per call.
    cache = llama.init_cache(model, 2)
    logits, state = step(cache, tokens[:, :4])
    outs = [logits]
    cache = state["cache"]
    for t in range(4, tokens.shape[1]):
        logits, state = step(cache, tokens[:, t : t + 1])
        outs.append(logits)
        cache = state["cache"]
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=2e-5)
    assert int(cache["layers_0"]["attn"]["cache_index"]) == tokens.shape[1]


def test_scan_matches_loop(small):
    model, params, tokens = small
    scanned = _small(scan_layers=True, remat="dots")
    stacked = stack_layers(params)
    np.testing.assert_allclose(
        scanned.apply({"params": stacked}, tokens), model.apply({"params": params}, tokens), atol=1e-5
    )
    # The scanned model decodes with a stacked cache too.
    cache = llama.init_cache(scanned, 2)
    assert cache["layers"]["attn"]["cached_key"].shape == (2, 2, 24, 2, 8)
    logits, _ = scanned.apply({"params": stacked, "cache": cache}, tokens, decode=True, mutable=["cache"])
    np.testing.assert_allclose(logits, model.apply({"params": params}, tokens), atol=2e-5)


def test_gradients_scanned_remat(small):
    _, params, tokens = small
    scanned = _small(scan_layers=True, remat="full")
    stacked = stack_layers(params)
    grads = jax.jit(jax.grad(lambda p: scanned.apply({"params": p}, tokens).mean()))(stacked)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_rope_and_rmsnorm():
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    y = rope(x, jnp.arange(5))
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[:, 0], x[:, 0])  # position 0 is not rotated
    # Relative: <rope(q, m), rope(k, n)> depends only on m - n.
    q, k = x[:, :1], x[:, 1:2]
    dot = lambda m, n: jnp.sum(rope(q, jnp.array([m])) * rope(k, jnp.array([n])))  # noqa: E731
    np.testing.assert_allclose(dot(3, 1), dot(7, 5), rtol=1e-4)
    h = jnp.arange(1.0, 5.0)[None]
    out = RMSNorm(1e-6).apply({"params": {"scale": jnp.ones(4)}}, h)
    np.testing.assert_allclose(out, h / jnp.sqrt(jnp.mean(h**2)), rtol=1e-5)


@pytest.mark.parametrize(
    "arg, expected",
    [("llama2_7b", 6_738_415_616), ("llama3_8b", 8_030_261_248), ("llama2_70b", 68_976_648_192)],
)
def test_published_param_counts(arg, expected):
    model = models.build(_get_config(arg))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"]))) == expected
