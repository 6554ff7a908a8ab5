"""Flash attention for GPUs written in Pallas (Triton lowering): forward and backward kernels.

Layout [batch, length, heads, head_dim], as `jax.nn.dot_product_attention`; k/v may have fewer heads
than q (grouped / multi-query attention: query head h reads kv head h // (H // Hkv), as the reference).

Algorithm (FlashAttention-2):

* forward, grid (q blocks, batch, heads): one program holds a [block_q, D] tile of q and streams kv
  tiles through an online softmax in float32 (base-2 exponentials, the scale folded into log2(e)).
  It writes the output and the per-row logsumexp (base 2), the only residual besides q, k, v, out.
* backward, two kernels that need no atomics: dq with grid (q blocks, batch, heads) streaming kv
  tiles; dk/dv with grid (kv blocks, batch, kv heads) streaming q tiles of every query head in the
  group, so grouped-query gradients are summed in registers. delta = rowsum(out * dout) is one fused
  XLA reduction before them.
* causal: queries are the last q_len positions of the kv sequence (decode with a cache). Tiles
  entirely above the diagonal are never visited; tiles entirely below it take a mask-free loop, so
  only the diagonal tiles (and the tail tile, and every tile when segment ids are given) pay for the
  mask. Causal programs are launched heaviest first for a better tail of the wave.

* static mask (`static_mask=masks.DalleMask(...)`, DALL-E's row / column / conv masks): its block
  map per kernel tiling becomes a schedule table (`masks.kv_schedule`): each program walks its FULL
  tiles without a mask, then its PARTIAL tiles with the mask's predicate on positions; EMPTY tiles
  are never loaded. The mask is causal by itself (causal=True adds nothing).

Modules: this one (API, forward kernel, custom VJP), `gpu_common.py` (tiles, masking, the query-tile
walk, the pallas_call wrapper), `gpu_backward.py` (the dq and dk/dv kernels).

Lengths that are not a multiple of the tiles are zero-padded outside the kernels and the padded keys
masked inside; head dims that are not a power of two (Triton needs one) are zero-padded to the next.
Aligned shapes (the common case) are passed through without a copy.

Masking uses a large finite negative logit for masked (causal/segment) keys and -inf for padded keys.
A query that may attend to no key at all (possible only with segment ids) therefore gets the mean of
the values it visits, and the matching gradients, as the reference does with finfo.min. That is
exact without causal; with causal + segment ids only tiles left of the diagonal are visited, so such
rows (which attend to nothing) differ from the reference. Causal with Tq > Tk is refused.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from vlm_jax.kernels.attention import masks, reference
from vlm_jax.kernels.attention.gpu_backward import _bwd_kernels
from vlm_jax.kernels.attention.gpu_common import (  # noqa: F401  (MIN_BLOCK, SHORT_LEN: public names here)
    _M_INIT,
    MAX_HEAD_DIM,
    MIN_BLOCK,
    SHORT_LEN,
    Tiles,
    _clamp_block,
    _dot,
    _fori,
    _head_specs,
    _padded_head_dim,
    _pallas,
    _pop_schedule,
    _q_block_index,
    _query_tile,
    _query_tile_inputs,
    _round_up,
    _Static,
    default_tiles,
    short_tiles,
)


def unsupported_reason(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    static_mask: masks.DalleMask | None = None,
) -> str | None:
    """Why `mha` cannot do this call, or None when it can (shapes and dtypes only, not the backend)."""
    reason = reference.kernel_unsupported_reason(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        static_mask=static_mask,
    )
    if reason is None and q.shape[-1] > MAX_HEAD_DIM:
        reason = f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM} (the tiles would not fit in shared memory)"
    return reason


def mha(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    block_q_dkv: int | None = None,
    block_k_dkv: int | None = None,
    block_q_dq: int | None = None,
    block_k_dq: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    num_warps_bwd: int | None = None,
    num_stages_bwd: int | None = None,
    block_h: int | None = None,
    interpret: bool = False,
    poison_outputs: bool = False,
    static_mask: masks.DalleMask | None = None,
) -> jax.Array:
    """Flash attention, q [B, Tq, H, D], k/v [B, Tk, Hkv, D] -> [B, Tq, H, D]; differentiable.

    Args:
      causal: query i sits at kv position i + Tk - Tq and sees keys at positions <= its own.
      segment_ids: [B, Tq] ints; a query sees only keys of its segment (packed sequences).
      kv_segment_ids: [B, Tk]; defaults to segment_ids (then Tq must equal Tk).
      sm_scale: logit scale, default D ** -0.5.
      block_q, block_k: forward tiles (query rows x keys). Given alone, they also set the backward
        tiles; block_{q,k}_{dkv,dq} set those of the dk/dv and dq kernels. None: `default_tiles`.
        All are powers of two >= 16, shrunk for short sequences.
      num_warps, num_stages: Triton launch parameters of the forward kernel; *_bwd: of the backward
        kernels. Ignored in interpret mode.
      block_h: query heads per forward / dq program; it divides the heads, and it divides the
        query heads per kv head or is a multiple of them. None: `short_tiles` for short sequences
        (with their whole-row tiles), else 1.
      interpret: run the kernels in the Pallas interpreter (any backend; how the tests run).
      poison_outputs: testing aid: kernel outputs start as NaN (aliased NaN inputs), so an element a
        kernel never writes shows up as NaN instead of stale memory.
      static_mask: a `masks.DalleMask` (causal by itself; causal=True adds nothing). Every kernel
        walks only the tiles its block map does not empty (`masks.kv_schedule`, one table row per
        program), with the mask's predicate on PARTIAL tiles and no mask on FULL ones.
    """
    reason = unsupported_reason(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        static_mask=static_mask,
    )
    if reason is not None:
        raise ValueError(f"pallas_gpu attention cannot do this call: {reason}")
    _, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    groups = h // hkv
    defaults = short_tiles(d, q.dtype, tq, tk, h, groups) or default_tiles(d, q.dtype)
    block_h = defaults.block_h if block_h is None else int(block_h)
    if block_h < 1 or h % block_h or (block_h % groups and groups % block_h):
        raise ValueError(
            f"block_h {block_h} must divide the {h} query heads and divide or be a multiple of the "
            f"{groups} query heads per kv head"
        )

    def pick(value: int | None, fallback: int | None, default: int) -> int:
        return value if value is not None else fallback if fallback is not None else default

    tiles = Tiles(
        block_q=_clamp_block(pick(block_q, None, defaults.block_q), tq),
        block_k=_clamp_block(pick(block_k, None, defaults.block_k), tk),
        block_q_dkv=_clamp_block(pick(block_q_dkv, block_q, defaults.block_q_dkv), tq),
        block_k_dkv=_clamp_block(pick(block_k_dkv, block_k, defaults.block_k_dkv), tk),
        block_q_dq=_clamp_block(pick(block_q_dq, block_q, defaults.block_q_dq), tq),
        block_k_dq=_clamp_block(pick(block_k_dq, block_k, defaults.block_k_dq), tk),
        num_warps=pick(num_warps, None, defaults.num_warps),
        num_stages=pick(num_stages, None, defaults.num_stages),
        num_warps_bwd=pick(num_warps_bwd, None, defaults.num_warps_bwd),
        num_stages_bwd=pick(num_stages_bwd, None, defaults.num_stages_bwd),
        block_h=block_h,
    )
    st = _Static(
        causal=bool(causal) and static_mask is None,
        sm_scale=float(d**-0.5 if sm_scale is None else sm_scale),
        q_len=tq,
        kv_len=tk,
        groups=groups,
        tiles=tiles,
        interpret=bool(interpret),
        poison=bool(poison_outputs),
        mask=static_mask,
    )

    # Pad lengths to a multiple of every tile that walks them, and head_dim to a power of two.
    tq_pad = _round_up(tq, max(tiles.block_q, tiles.block_q_dkv, tiles.block_q_dq))
    tk_pad = _round_up(tk, max(tiles.block_k, tiles.block_k_dkv, tiles.block_k_dq))
    d_pad = _padded_head_dim(d)

    def pad(x: jax.Array, length: int) -> jax.Array:
        widths = ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - d))
        return jnp.pad(x, widths) if any(w[1] for w in widths) else x

    def pad_ids(s: jax.Array | None, length: int) -> jax.Array | None:
        if s is None:
            return None
        s = s.astype(jnp.int32)
        return jnp.pad(s, ((0, 0), (0, length - s.shape[1]))) if length != s.shape[1] else s

    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    out = _flash(
        pad(q, tq_pad),
        pad(k, tk_pad),
        pad(v, tk_pad),
        pad_ids(segment_ids, tq_pad),
        pad_ids(kv_segment_ids, tk_pad),
        st,
    )
    if (tq_pad, d_pad) != (tq, d):
        out = out[:, :tq, :, :d]
    return out


# --------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs: Any, st: _Static, segments: bool, n_q_blocks: int) -> None:
    refs, sched_ref = _pop_schedule(refs, 2, st)
    if segments:
        q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        q_ids_ref = kv_ids_ref = None
    bq, bk = st.tiles.block_q, st.tiles.block_k
    d = q_ref.shape[-1]
    heads, full, end, tile = _query_tile(st, k_ref, v_ref, q_ids_ref, kv_ids_ref, bq, bk, n_q_blocks, sched_ref)

    for hh in range(st.tiles.block_h):  # the program's query heads, one after another
        q = heads.q(q_ref, hh)

        def body(j: jax.Array, carry: Any, masked: bool, q=q, hh=hh) -> Any:
            acc, m, denom = carry
            _, v, s, _ = tile(q, hh, j, masked)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[:, None])
            denom = denom * alpha + jnp.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
            return acc, m_new, denom

        carry = (
            jnp.zeros((bq, d), jnp.float32),
            jnp.full((bq,), _M_INIT, jnp.float32),
            jnp.zeros((bq,), jnp.float32),
        )
        carry = _fori(0, full, functools.partial(body, masked=False), carry)
        carry = _fori(full, end, functools.partial(body, masked=True), carry)
        acc, m, denom = carry  # denom >= 1: the running max's own term is exp2(0)
        heads.store_q(o_ref, hh, (acc / denom[:, None]).astype(o_ref.dtype))
        heads.store_row(lse_ref, hh, m + jnp.log2(denom))


def _fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array | None, kv_ids: jax.Array | None, st: _Static
) -> tuple[jax.Array, jax.Array]:
    """Padded q [B, Tq', H, D'], k/v [B, Tk', Hkv, D'] -> (out like q, lse [B, H, Tq'] float32, base 2)."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    bq = st.tiles.block_q
    n_q = tq // bq
    qb = _q_block_index(st, n_q)
    segments = q_ids is not None
    q_spec, kv_spec, row_spec = _head_specs(st, bq, tk, d, qb)
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [q, k, v]
    more_specs, more_args = _query_tile_inputs(st, bq, st.tiles.block_k, tq, tk, qb, q_ids, kv_ids)
    in_specs += more_specs
    args += more_args
    out, lse = _pallas(
        functools.partial(_fwd_kernel, st=st, segments=segments, n_q_blocks=n_q),
        grid=(n_q, b, h // st.tiles.block_h),
        in_specs=in_specs,
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tq), jnp.float32)],
        args=args,
        st=st,
        num_warps=st.tiles.num_warps,
        num_stages=st.tiles.num_stages,
        name="flash_attention_fwd",
    )
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(
    q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array | None, kv_ids: jax.Array | None, st: _Static
) -> jax.Array:
    return _fwd(q, k, v, q_ids, kv_ids, st)[0]


def _flash_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array | None, kv_ids: jax.Array | None, st: _Static
) -> tuple[jax.Array, tuple[Any, ...]]:
    out, lse = _fwd(q, k, v, q_ids, kv_ids, st)
    return out, (q, k, v, q_ids, kv_ids, out, lse)


def _flash_bwd(st: _Static, res: tuple[Any, ...], do: jax.Array) -> tuple[Any, ...]:
    q, k, v, q_ids, kv_ids, out, lse = res
    dq, dk, dv = _bwd_kernels(q, k, v, q_ids, kv_ids, out, lse, do, st)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
