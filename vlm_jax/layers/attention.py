"""Multi-head attention over `vlm_jax.kernels.attention`: self-attention, or queries attending to a
separate key/value sequence (the attention pooling of CLIP's ResNet)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax import kernels
from vlm_jax.layers.linear import DenseGeneral


class MultiHeadAttention(nn.Module):
    """Params: query/key/value [E, H, D] (+ bias [H, D]); out kernel [H, D, E_out] (+ bias)."""

    num_heads: int
    head_dim: int | None = None  # None: input width // num_heads
    out_features: int | None = None  # None: the input width
    causal: bool = False
    qkv_bias: bool = True
    out_bias: bool = True
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, kv: jax.Array | None = None, *, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """x [B, Tq, E] (queries), kv [B, Tk, E] (None: x) -> [B, Tq, out_features or E]."""
        width = x.shape[-1]
        if self.head_dim is None and width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
        head_dim = self.head_dim or width // self.num_heads
        kv = x if kv is None else kv

        def project(name: str, inputs: jax.Array) -> jax.Array:
            y = DenseGeneral(
                (self.num_heads, head_dim),
                (-1,),
                ("embed", "heads", "kv"),
                use_bias=self.qkv_bias,
                dtype=self.dtype,
                name=name,
            )(inputs)
            return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

        q, k, v = project("query", x), project("key", kv), project("value", kv)
        y = kernels.attention(q, k, v, causal=self.causal, segment_ids=segment_ids, impl=self.impl)
        return DenseGeneral(
            (self.out_features or width,),
            (-2, -1),
            ("heads", "kv", "embed"),
            use_bias=self.out_bias,
            dtype=self.dtype,
            name="out",
        )(y.astype(self.dtype))
