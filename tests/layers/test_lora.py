"""LoRA: adapters start as a no-op, merge exactly into the base weights, and a LoRA run trains and
stores only the adapters (frozen base: no gradient, no optimiser state, not in checkpoints)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vlm_jax import config as config_lib
from vlm_jax.layers import lora
from vlm_jax.layers.linear import DenseGeneral
from vlm_jax.models import llama
from vlm_jax.train import optim


def _small(**kw):
    args = dict(vocab_size=61, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=48, max_len=24)
    args.update(kw)
    return llama.Llama(**args)


def _randomise_adapters(params, seed=1):
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.1 * jax.random.normal(next(keys), x.shape) if lora.is_adapter(p) else x, params
    )


def test_dense_adapter_starts_as_identity_and_merges():
    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    base = DenseGeneral((4, 6), (-1,), ("embed", "heads", "kv"), use_bias=False)
    adapted = DenseGeneral((4, 6), (-1,), ("embed", "heads", "kv"), use_bias=False, lora_rank=2, lora_alpha=4.0)
    params = nn.unbox(adapted.init(jax.random.key(1), x))["params"]
    assert params["lora_a"].shape == (8, 2) and params["lora_b"].shape == (2, 4, 6)
    plain = {"kernel": params["kernel"]}
    np.testing.assert_allclose(adapted.apply({"params": params}, x), base.apply({"params": plain}, x), atol=1e-6)
    params = _randomise_adapters(params)
    merged = lora.merge({"d": params}, 4.0)["d"]
    assert set(merged) == {"kernel"}
    np.testing.assert_allclose(adapted.apply({"params": params}, x), base.apply({"params": merged}, x), atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_llama_with_adapters_equals_merged_llama(scan):
    spec = llama.LoraSpec(rank=4, alpha=8.0, targets=("query", "value", "down"))
    model = _small(lora=spec, scan_layers=scan)
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 61)
    # Jitted: op by op, the models' many small ops each compile on their own (twice the time).
    params = jax.jit(lambda: _randomise_adapters(nn.unbox(model.init(jax.random.key(0), tokens))["params"]))()
    merged = lora.merge(params, 8.0)
    assert not lora.has_adapters(merged)
    np.testing.assert_allclose(
        jax.jit(model.apply)({"params": params}, tokens),
        jax.jit(_small(scan_layers=scan).apply)({"params": merged}, tokens),
        atol=2e-5, rtol=2e-5,
    )
    with pytest.raises(ValueError, match="not projections"):
        llama.LoraSpec(rank=2, targets=("qkv",))


def test_frozen_params_have_no_optimizer_state():
    model = _small(lora=llama.LoraSpec(rank=2))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    config = config_lib.load("configs/llama.py:tiny", {"model.lora.rank": 2, "optim.warmup_steps": 0})
    trainable = optim.trainable_fn(config)
    tx = optim.make_optimizer(config.optim, 10, trainable)
    state = jax.jit(tx.init)(params)
    n_adapters = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if lora.is_adapter(p))
    n_state = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim > 0)
    assert n_state == 2 * n_adapters  # Adam's two moments, for the adapters only
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        assert bool(jnp.any(u != 0)) == lora.is_adapter(path), lora.path_string(path)
    # A regex picks trainable params without LoRA (e.g. only the output head).
    head_only = config_lib.load("configs/llama.py:tiny", {"optim.trainable": "lm_head"})
    mask = optim.trainable_fn(head_only)(params)
    trained = [lora.path_string(p) for p, t in jax.tree_util.tree_flatten_with_path(mask)[0] if t]
    assert trained == ["lm_head/kernel"]


def _tiny_lm(tmp_path, steps, **overrides):
    from vlm_jax.data import text
    from vlm_jax.data.tokenizer import Tokenizer

    tok_path = tmp_path / "tok"
    if not (tmp_path / "tok.model").exists():
        Tokenizer.train(text.tokenizer_corpus(0, 300), str(tok_path), 512)
    base = {
        "data.source": "world_instruct", "data.batch_size": 8, "data.text_length": 96,
        "tokenizer.path": str(tmp_path / "tok.model"), "model.width": 32, "model.heads": 4,
        "model.kv_heads": 2, "model.depth": 2, "model.mlp_dim": 64, "model.max_len": 96,
        "train.steps": steps, "train.log_every": 1, "train.ckpt_every": 1000, "train.eval_every": 0,
        "train.progress": False, "train.async_checkpoints": False, "optim.warmup_steps": 1,
    }
    base.update(overrides)
    config = config_lib.load("configs/llama.py:tiny", base)
    return config


def test_lora_run_trains_and_checkpoints_only_adapters(tmp_path):
    from vlm_jax.train.metrics import read_metrics
    from vlm_jax.train.trainer import train

    train(_tiny_lm(tmp_path, 3), str(tmp_path / "base"))
    base_params = ocp.StandardCheckpointer().restore(str(tmp_path / "base/checkpoints/3/state"))["params"]
    overrides = {"model.lora.rank": 4, "train.init_from": str(tmp_path / "base"), "optim.lr": 1e-2}
    summary = train(_tiny_lm(tmp_path, 6, **overrides), str(tmp_path / "lora"), stop_at_step=3)
    assert summary["step"] == 3
    stored = ocp.StandardCheckpointer().restore(str(tmp_path / "lora/checkpoints/3/state"))
    stored_paths = [lora.path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(stored["params"])[0]]
    assert stored_paths and all(p.endswith(("lora_a", "lora_b")) for p in stored_paths)
    assert any("query" in p for p in stored_paths) and not any("mlp" in p for p in stored_paths)
    # Resume: the base comes back from init_from, the adapters from the checkpoint.
    summary = train(_tiny_lm(tmp_path, 6, **overrides), str(tmp_path / "lora"))
    assert summary["finished"]
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "lora") if "train/loss" in r]
    assert len(losses) == 6 and np.isfinite(losses).all()
    final = ocp.StandardCheckpointer().restore(str(tmp_path / "lora/checkpoints/6/state"))["params"]
    flat = jax.tree_util.tree_flatten_with_path(final)[0]
    adapters_b = [x for p, x in flat if lora.path_string(p).endswith("lora_b")]
    assert any(np.abs(b).max() > 0 for b in adapters_b)  # the adapters moved off their zero init
    # Same run without stopping gives the same adapters (exact resume with a frozen base).
    train(_tiny_lm(tmp_path, 6, **overrides), str(tmp_path / "straight"))
    straight = ocp.StandardCheckpointer().restore(str(tmp_path / "straight/checkpoints/6/state"))["params"]
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(straight)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert os.path.exists(tmp_path / "base/checkpoints/3")
    assert base_params["embed"]["embedding"].shape[0] == 512
