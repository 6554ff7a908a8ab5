"""LayerNorm computed in float32 whatever the compute dtype, with logically named params."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class LayerNorm(nn.Module):
    """Normalises the last axis: [..., C] -> [..., C] in `dtype`; params `scale`, `bias` [C]."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    axis_name: str = "embed"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., C] -> [..., C]; statistics in float32 so bf16 inputs do not lose precision."""
        features = x.shape[-1]
        names = (self.axis_name,)
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, names),
            (features,),
            jnp.float32,
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        # Biased variance, as torch.nn.LayerNorm, so imported weights reproduce exactly.
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, names),
                (features,),
                jnp.float32,
            )
            y = y + bias
        return y.astype(self.dtype)
