"""Pure-JAX attention: the reference every other implementation is checked against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.kernels.attention.masks import DalleMask


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
    static_mask: DalleMask | None = None,
) -> jax.Array:
    """Softmax attention. q [B, Tq, H, D], k/v [B, Tk, Hkv, D] with H % Hkv == 0 -> [B, Tq, H, D].

    static_mask: a `DalleMask` (dense, ANDed with the causal and segment masks); its lengths are
    checked (ValueError).
    """
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
    if static_mask is not None:
        static_mask.check_lengths(tq, tk)
        dense = jnp.asarray(static_mask.dense(tq, tk))[None, None]
        mask = dense if mask is None else jnp.logical_and(mask, dense)
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights.astype(v.dtype), v)
    return out.reshape(b, tq, h, d)


KERNEL_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def kernel_unsupported_reason(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    static_mask: DalleMask | None = None,
) -> str | None:
    """Why a flash kernel (pallas_gpu, pallas_tpu) cannot take this call, or None.

    The checks every kernel shares, on shapes and dtypes only: [B, T, H, D] layout, one float
    dtype of KERNEL_DTYPES, whole kv-head groups, causal with no more queries than keys (else
    the first rows see no key), segment ids that are [B, T] integers for both sides, and a
    static mask that is a `DalleMask` whose lengths fit the call.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return f"q, k, v must be [batch, length, heads, head_dim], got {q.shape}, {k.shape}, {v.shape}"
    if len({jnp.dtype(x.dtype) for x in (q, k, v)}) != 1:
        return f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if jnp.dtype(q.dtype) not in KERNEL_DTYPES:
        return f"dtype {q.dtype} is not one of float16, bfloat16, float32"
    b, tq, h, d = q.shape
    if k.shape != v.shape:
        return f"k and v must have the same shape, got {k.shape} and {v.shape}"
    if k.shape[0] != b or k.shape[3] != d:
        return f"k/v {k.shape} do not match q {q.shape} in batch or head_dim"
    tk, hkv = k.shape[1], k.shape[2]
    if min(tq, tk, h, hkv, d) < 1:
        return "empty dimension"
    if h % hkv:
        return f"query heads {h} must be a multiple of kv heads {hkv}"
    if causal and tq > tk:
        return f"causal with more queries (q_len {tq}) than keys (kv_len {tk}): the first rows would see no key"
    if segment_ids is None and kv_segment_ids is not None:
        return "kv_segment_ids without segment_ids"
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (b, tq):
            return f"segment_ids must be [batch, q_len] = {(b, tq)}, got {segment_ids.shape}"
        if kv_segment_ids is None and tq != tk:
            return "segment_ids with q and kv of different lengths needs kv_segment_ids"
        if kv_segment_ids is not None and tuple(kv_segment_ids.shape) != (b, tk):
            return f"kv_segment_ids must be [batch, kv_len] = {(b, tk)}, got {kv_segment_ids.shape}"
        for s in (segment_ids, kv_segment_ids):
            if s is not None and not jnp.issubdtype(s.dtype, jnp.integer):
                return f"segment ids must be integers, got {s.dtype}"
    if static_mask is not None:
        if not isinstance(static_mask, DalleMask):
            return f"static_mask must be a DalleMask, got {type(static_mask).__name__}"
        return static_mask.length_error(tq, tk)
    return None

