"""A flash-attention stand-in: what the target's kernel keeps in memory, compilable on any backend.

On the target the dispatcher (vlm_jax.kernels.attention.choose_impl) picks a flash kernel for long
sequences (cuDNN or Pallas on GPU, Pallas on TPU) that keeps only q, k, v, the output and the row
logsumexp for the backward pass. The CPU compiler cannot compile those kernels, and the XLA
reference would materialise [B, H, T, T] scores, so wherever the target would run a flash kernel
the plan compiles a stand-in with the same residuals (blockwise attention with an online softmax,
custom_vjp; see `flash_attention_standin`). `attention="xla"` compiles as is. The stand-in computes
masked causal blocks that the kernels skip, so the jaxpr FLOPs count full (unmasked) attention, as
the analytic attention term does.
"""

from __future__ import annotations

import contextlib
import functools


def _mask(q_pos, kv_pos, q_ids, kv_ids, kv_len, causal):
    """[B, 1, 1, bq, bk] bool from positions [bq], [bk] and segment ids [B, bq], [B, bk]; causal
    is a bool or a static DALL-E mask (kernels.attention.masks.DalleMask, its predicate)."""
    import jax.numpy as jnp

    valid = jnp.broadcast_to((kv_pos < kv_len)[None, :], (q_pos.shape[0], kv_pos.shape[0]))
    if hasattr(causal, "allowed"):
        valid = valid & causal.allowed(q_pos[:, None], kv_pos[None, :])
    elif causal:
        valid = valid & (kv_pos[None, :] <= q_pos[:, None])
    same = q_ids[:, :, None] == kv_ids[:, None, :]
    return (valid[None] & same)[:, None, None]


def _blocks(x, n):
    """[B, n*b, ...] -> [n, B, b, ...]."""
    import jax.numpy as jnp

    return jnp.moveaxis(x.reshape((x.shape[0], n, x.shape[1] // n) + x.shape[2:]), 1, 0)


def _unblocks(x):
    """[n, B, b, ...] -> [B, n*b, ...]."""
    import jax.numpy as jnp

    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _flash_fwd(q, k, v, q_ids, kv_ids, causal, scale, block, kv_len):
    """q [B, T, Hkv, G, D], k/v [B, T, Hkv, D], ids [B, T] (T whole blocks; keys from kv_len on are
    padding) -> (out [B, T, Hkv, G, D], residuals)."""
    import jax
    import jax.numpy as jnp

    b, t, hkv, g, d = q.shape
    n = t // block
    neg = jnp.finfo(jnp.float32).min
    kv = (jnp.arange(n), _blocks(k, n), _blocks(v, n), _blocks(kv_ids, n))

    def q_block(args):
        qi, q_blk, qid = args
        q_pos = qi * block + jnp.arange(block)

        def kv_step(carry, xs):
            m, denom, acc = carry
            kj, k_blk, v_blk, kid = xs
            s = jnp.einsum("bqhgd,bkhd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
            s = jnp.where(_mask(q_pos, kj * block + jnp.arange(block), qid, kid, kv_len, causal), s, neg)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            denom = denom * corr + p.sum(-1)
            pv = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
            acc = acc * jnp.moveaxis(corr, -1, 1)[..., None] + pv
            return (m_new, denom, acc), None

        init = (
            jnp.full((b, hkv, g, block), neg, jnp.float32),
            jnp.zeros((b, hkv, g, block), jnp.float32),
            jnp.zeros((b, block, hkv, g, d), jnp.float32),
        )
        (m, denom, acc), _ = jax.lax.scan(kv_step, init, kv)
        out = acc / jnp.moveaxis(denom, -1, 1)[..., None]
        return out.astype(q.dtype), m + jnp.log(denom)

    out, lse = jax.lax.map(q_block, (jnp.arange(n), _blocks(q, n), _blocks(q_ids, n)))
    out = _unblocks(out)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, hkv, g, t)  # [n, B, Hkv, G, bq] -> [B, Hkv, G, T]
    return out, (q, k, v, q_ids, kv_ids, out, lse)


def _flash_bwd(causal, scale, block, kv_len, res, dout):
    import jax
    import jax.numpy as jnp

    q, k, v, q_ids, kv_ids, out, lse = res
    b, t, hkv, g, d = q.shape
    n = t // block
    delta = jnp.einsum("bqhgd,bqhgd->bhgq", dout.astype(jnp.float32), out.astype(jnp.float32))
    per_q = (
        jnp.arange(n), _blocks(q, n), _blocks(dout, n), _blocks(q_ids, n),
        jnp.moveaxis(lse.reshape(b, hkv, g, n, block), 3, 0),
        jnp.moveaxis(delta.reshape(b, hkv, g, n, block), 3, 0),
    )

    def kv_block(dq, xs):
        kj, k_blk, v_blk, kid = xs
        kv_pos = kj * block + jnp.arange(block)

        def q_step(carry, ys):
            dk, dv = carry
            qi, q_blk, do_blk, qid, lse_i, delta_i = ys
            q_pos = qi * block + jnp.arange(block)
            s = jnp.einsum("bqhgd,bkhd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
            mask = _mask(q_pos, kv_pos, qid, kid, kv_len, causal)
            p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
            dv = dv + jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(do_blk.dtype), do_blk,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqhgd,bkhd->bhgqk", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) * scale
            dq_i = jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(k_blk.dtype), k_blk,
                              preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(q_blk.dtype), q_blk,
                                 preferred_element_type=jnp.float32)
            return (dk, dv), dq_i

        zeros = jnp.zeros((b, block, hkv, d), jnp.float32)
        (dk, dv), dq_parts = jax.lax.scan(q_step, (zeros, zeros), per_q)
        return dq + _unblocks(dq_parts), (dk, dv)

    kv = (jnp.arange(n), _blocks(k, n), _blocks(v, n), _blocks(kv_ids, n))
    dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(q.shape, jnp.float32), kv)
    return dq.astype(q.dtype), _unblocks(dk).astype(k.dtype), _unblocks(dv).astype(v.dtype), None, None


@functools.lru_cache(maxsize=None)
def _flash():
    """The custom_vjp (built on first use, so importing this module does not import jax)."""
    import jax

    fn = jax.custom_vjp(lambda *args: _flash_fwd(*args)[0], nondiff_argnums=(5, 6, 7, 8))
    fn.defvjp(_flash_fwd, _flash_bwd)
    return fn


def flash_attention_standin(
    q, k, v, *, causal: bool = False, segment_ids=None, kv_segment_ids=None, sm_scale=None, block: int = 128,
    static_mask=None,
):
    """Attention with a flash kernel's memory profile on any backend; the contract of
    vlm_jax.kernels.attention (q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]).

    Blockwise over query and key blocks with an online softmax; a custom_vjp keeps only q, k, v,
    the output and the row logsumexp for the backward pass, which recomputes the scores block by
    block (FlashAttention-2's algorithm, as the cuDNN and Pallas kernels do). Sequences up to
    4 * block are one block; longer ones are padded to whole blocks (padded keys masked, padded
    queries dropped). Calls with fewer queries than keys (decode) go to the XLA reference. A
    static (DALL-E) mask replaces the causal test by its predicate. The values and gradients are
    exact; `plan` compiles this where the target runs a flash kernel.
    """
    import jax.numpy as jnp

    from vlm_jax.kernels.attention import reference

    bsz, t, h, d = q.shape
    hkv = k.shape[2]
    if k.shape[1] != t:
        return reference.attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                   kv_segment_ids=kv_segment_ids, sm_scale=sm_scale, static_mask=static_mask)
    if h % hkv:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {hkv}")
    scale = float(d**-0.5 if sm_scale is None else sm_scale)
    if segment_ids is None:
        q_ids = kv_ids = jnp.zeros((bsz, t), jnp.int32)
    else:
        q_ids = segment_ids.astype(jnp.int32)
        kv_ids = (segment_ids if kv_segment_ids is None else kv_segment_ids).astype(jnp.int32)
    size = t if t <= 4 * block else block
    pad = -t % size
    qg = q.reshape(bsz, t, hkv, h // hkv, d)
    if pad:
        qg = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
        q_ids, kv_ids = (jnp.pad(x, ((0, 0), (0, pad))) for x in (q_ids, kv_ids))
    mask = static_mask if static_mask is not None else bool(causal)
    out = _flash()(qg, k, v, q_ids, kv_ids, mask, scale, size, t)
    return out[:, :t].reshape(bsz, t, h, d)


@contextlib.contextmanager
def target_attention(backend: str, mode: str = "target"):
    """Inside: vlm_jax.kernels.attention does what `backend`'s dispatcher would, compilable here.

    Calls the target would send to a flash kernel (cudnn, pallas_gpu, pallas_tpu, by
    kernels.attention.choose_impl for `backend`) run the stand-in; the others the XLA reference.
    mode "xla": every call runs the reference. Yields a list collecting (impl, q shape) per call.
    """
    import importlib

    from vlm_jax import kernels

    dispatcher = importlib.import_module("vlm_jax.kernels.attention")
    original = kernels.attention
    seen: list[tuple[str, tuple]] = []

    def attention(q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, sm_scale=None,
                  impl="auto", interpret=False, static_mask=None):
        del interpret
        kw = dict(causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, static_mask=static_mask)
        chosen = impl
        if mode == "xla":
            chosen = "xla"
        elif impl == "auto":
            chosen = dispatcher.choose_impl(q, k, v, backend=backend, **kw)
        seen.append((chosen, tuple(q.shape)))
        if chosen == "xla":
            return dispatcher.reference.attention(q, k, v, sm_scale=sm_scale, **kw)
        return flash_attention_standin(q, k, v, sm_scale=sm_scale, **kw)

    kernels.attention = attention
    try:
        yield seen
    finally:
        kernels.attention = original
