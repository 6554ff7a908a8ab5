"""Batched, jitted forward passes over numpy arrays (what every evaluator needs)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlm_jax.parallel.rules import batch_sharding


class BatchedApply:
    """Applies `model.<method>` to [N, ...] numpy inputs in fixed-size batches -> numpy [N, ...].

    The last batch is padded to the full size so the function compiles once.
    """

    def __init__(self, model: nn.Module, method: str | None, mesh: Mesh, rules: Any, batch_size: int):
        self.mesh, self.rules = mesh, rules
        shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
        self.batch_size = max(shards, (batch_size // shards) * shards)

        def fn(variables, x):
            kwargs = {"method": getattr(model, method)} if method else {}
            return model.apply(variables, x, **kwargs)

        # Replicated outputs: on several hosts a batch-sharded output could not be fetched whole.
        self._fn = jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __call__(self, params: Any, model_state: dict, x: np.ndarray) -> np.ndarray:
        """Outputs for all N inputs, float32 numpy."""
        variables = {"params": params, **model_state}
        sharding = batch_sharding(self.mesh, self.rules, x.ndim)
        outs = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start : start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n,) + chunk.shape[1:], chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out = self._fn(variables, jax.device_put(chunk, sharding))
            outs.append(np.asarray(jax.device_get(out), np.float32)[:n])
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, [N, E] -> [N, E]."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
