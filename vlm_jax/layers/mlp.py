"""Activations by name and the two-layer transformer MLP."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.linear import dense


def _quick_gelu(x: jax.Array) -> jax.Array:
    # OpenAI CLIP's sigmoid approximation of GELU; its weights were trained with it.
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The elementwise activation `name` (gelu: exact erf GELU; gelu_tanh: the approximation)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Mlp(nn.Module):
    """fc1 -> act -> fc2: [..., E] -> [..., E] through a hidden width `hidden_dim`."""

    hidden_dim: int
    act: str = "gelu"
    dtype: Any = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., E] -> [..., E]."""
        width = x.shape[-1]
        h = dense(
            self.hidden_dim, ("embed", "mlp"), dtype=self.dtype, use_bias=self.use_bias, name="fc1"
        )(x)
        if h.ndim == 3:
            h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = activation(self.act)(h)
        return dense(width, ("mlp", "embed"), dtype=self.dtype, use_bias=self.use_bias, name="fc2")(
            h
        )
