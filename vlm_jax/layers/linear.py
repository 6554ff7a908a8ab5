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
    """

    features: tuple[int, ...]
    axis: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    use_bias: bool = True
    dtype: Any = jnp.float32

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
        return y
