"""Pure-JAX attention: the reference every other implementation is checked against."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
) -> jax.Array | None:
    """Boolean mask [batch or 1, 1, q_len, kv_len]; True where a query may attend. None: no mask."""
    mask = None
    if causal:
        # Queries are the last q_len positions of the kv sequence (decode with a cache).
        q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        kv_pos = jnp.arange(kv_len)[None, :]
        mask = (kv_pos <= q_pos)[None, None]
    if q_segment_ids is not None:
        seg = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
        mask = seg if mask is None else jnp.logical_and(mask, seg)
    return mask


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Softmax attention. q [B, Tq, H, D], k/v [B, Tk, Hkv, D] with H % Hkv == 0 -> [B, Tq, H, D]."""
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {hkv}")
    scale = d**-0.5 if sm_scale is None else sm_scale
    if kv_segment_ids is None and segment_ids is not None:
        if tq != tk:
            raise ValueError("segment_ids with q and kv of different lengths needs kv_segment_ids")
        kv_segment_ids = segment_ids
    groups = h // hkv
    qg = q.reshape(b, tq, hkv, groups, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(
        tq, tk, causal=causal, q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids
    )
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights.astype(v.dtype), v)
    return out.reshape(b, tq, h, d)
