"""`attention(q, k, v, ...)`: layout [batch, length, heads, head_dim], as jax.nn.dot_product_attention.

Implementations: "xla" (the pure-JAX reference, any backend). Pallas GPU/TPU kernels and cuDNN
dispatch come with the kernels issue; until then "auto" means "xla" and asking for another
implementation is an error rather than a silent fallback.
"""

from __future__ import annotations

import jax

from vlm_jax.kernels.attention import reference

IMPLEMENTATIONS = ("auto", "xla")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    impl: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Multi-head attention, q [B, Tq, H, D], k/v [B, Tk, Hkv, D] -> [B, Tq, H, D]."""
    del interpret  # Only meaningful for the Pallas kernels.
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl {impl!r} is not available; choose one of {IMPLEMENTATIONS}")
    return reference.attention(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale)
