"""Dense projections whose params carry logical axis names (for the sharding rules)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Any
_XAVIER = nn.initializers.xavier_uniform()


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    dtype: Any = jnp.float32,
    use_bias: bool = True,
    kernel_init: Initializer = _XAVIER,
    bias_init: Initializer = nn.initializers.zeros,
    name: str | None = None,
) -> nn.Dense:
    """nn.Dense [..., in] -> [..., features]; kernel named `axes`, bias (axes[1],); f32 params."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)),
        name=name,
    )


class DenseGeneral(nn.Module):
    """[..., *in] -> [..., *features], contracting the `axis` dims; f32 params, logical names.

    Unlike nn.DenseGeneral, the kernel is created in its final shape, so its logical-partitioning
    box never holds a flattened value (flax would then apply a constraint of the wrong rank
    whenever a mesh is active, e.g. in its param shape check during apply).

    lora_rank > 0 adds a low-rank adapter (Hu et al. 2021): y += (x . lora_a) . lora_b * alpha / rank,
    lora_a [*in, rank] Gaussian (std 1/sqrt(fan_in)), lora_b [rank, *features] zeros, so a fresh
    adapter leaves the output unchanged. Which params train is the optimiser's business
    (vlm_jax.layers.lora).
    """

    features: tuple[int, ...]
    axis: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    use_bias: bool = True
    dtype: Any = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 16.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., *in] -> [..., *features] (the `axis` dims contracted, the rest kept in order)."""
        n_in, n_out = len(self.axis), len(self.features)
        axis = tuple(a % x.ndim for a in self.axis)
        in_shape = tuple(x.shape[a] for a in axis)
        # Xavier-uniform with fans over all input / output dims (as the flattened 2-D matrix).
        init = nn.initializers.variance_scaling(
            1.0,
            "fan_avg",
            "uniform",
            in_axis=tuple(range(n_in)),
            out_axis=tuple(range(n_in, n_in + n_out)),
        )
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.kernel_axes),
            in_shape + tuple(self.features),
            jnp.float32,
        )
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype), ((axis, tuple(range(n_in))), ((), ()))
        )
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[n_in:]),
                tuple(self.features),
                jnp.float32,
            )
            y = y + bias.astype(self.dtype)
        if self.lora_rank > 0:
            y = y + self._lora(x, axis, in_shape)
        return y

    def _lora(self, x: jax.Array, axis: tuple[int, ...], in_shape: tuple[int, ...]) -> jax.Array:
        n_in, rank = len(axis), self.lora_rank
        fan_in = 1
        for d in in_shape:
            fan_in *= d
        a = self.param(
            "lora_a",
            nn.with_logical_partitioning(
                nn.initializers.normal(fan_in**-0.5), self.kernel_axes[:n_in] + (None,)
            ),
            in_shape + (rank,),
            jnp.float32,
        )
        b = self.param(
            "lora_b",
            nn.with_logical_partitioning(nn.initializers.zeros, (None,) + self.kernel_axes[n_in:]),
            (rank,) + tuple(self.features),
            jnp.float32,
        )
        h = jax.lax.dot_general(
            x.astype(self.dtype), a.astype(self.dtype), ((axis, tuple(range(n_in))), ((), ()))
        )
        y = jax.lax.dot_general(h, b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
        return y * jnp.asarray(self.lora_alpha / rank, self.dtype)
