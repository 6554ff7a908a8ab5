"""Flash attention for TPU in Pallas (Mosaic): forward and backward kernels with online softmax.

`mha(q, k, v, ...)` takes the layout of `jax.nn.dot_product_attention` (q [B, Tq, H, D], k/v
[B, Tk, Hkv, D]) and matches `reference.attention` (values and gradients), with:

* grouped / multi-query KV heads (H % Hkv == 0): the dk/dv kernel sums over the query heads of a
  group in its VMEM accumulator, so no [B, Tk, H, D] intermediate is ever written;
* causal masks where the queries are the LAST Tq positions of the kv sequence (decode with a
  cache); kv blocks entirely in the future are skipped (and their DMA elided by pointing the
  index map at a block that is already resident);
* packed sequences through `segment_ids` [B, T] (and `kv_segment_ids` when Tq != Tk);
* static masks (`static_mask=masks.DalleMask(...)`: DALL-E's row / column / conv masks): the
  block map goes to SMEM as scalar prefetch; EMPTY tiles run nothing and their index maps point at
  the block already resident (no DMA), PARTIAL tiles apply the mask's predicate on positions, FULL
  tiles run mask-free (`masks.tpu_tables`, `tpu_common._run_blocks`);
* any lengths (padded internally to the block size, the padding masked) and any head dim (padded
  to a multiple of 128 on the TPU unless it is 64 or already a multiple of 128);
* bf16 / fp32 inputs natively, fp16 computed in fp32 (TPU MXUs have no fp16 path).

Kernels (FlashAttention-2 style, all accumulation in fp32 VMEM scratch):

* forward: grid (B, H / block_h, q blocks, kv blocks); running max / sum / output in scratch,
  writes the output and the per-row logsumexp (the only softmax residual kept for the backward
  pass);
* dq: grid (B, H / block_h, q blocks, kv blocks), recomputes the probabilities from the logsumexp;
* dk/dv: grid (B, Hkv / block_hkv, kv blocks, group, q blocks), works on the transposed scores
  [block_k, block_q] so that the per-query logsumexp and `di = rowsum(o * do)` broadcast along
  sublanes without relayouts.

A forward / dq program handles `block_h` query heads and a dk/dv program `block_hkv` kv heads, one
after another in a static loop (the mask of a tile is shared by them). For long sequences both are
1: a program already has many tiles to walk. For short ones (ViT's 197 tokens, CLIP text's 77) where
the whole padded sequence is one tile on both axes, one head per program would make each grid step
a single small tile and the ~0.35 us per-step overhead would dominate; the default is then the
largest of 8, 6, 4, 3, 2 that divides the heads (for block_h: and divides or is a multiple of the query
heads per kv head) and keeps the program's VMEM under `_HEAD_BLOCK_VMEM_BUDGET`. The heads of a
forward / dq block share one kv head (block_h <= group) or span block_h / group whole kv heads.

Internally the kernels use the [B, heads, T, D] layout (one transpose each way in XLA) so that every
block is a dense (rows, head_dim) tile. Rows with no visible key at all (possible only with segment
ids that appear in q but not in kv) give a zero output here, while the reference averages all of v.

Modules: this one (API, block sizes, forward kernel, custom VJP), `tpu_common.py` (configuration,
tile masks and dispatch, BlockSpecs, the scalar-prefetch pallas_call wrapper), `tpu_backward.py`
(the dq and dk/dv kernels).

Interpret mode (`interpret=True` or a `pltpu.InterpretParams`) runs the same kernels on CPU; there
block sizes only need to be multiples of 8, on a TPU multiples of 128.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vlm_jax.kernels.attention import masks, reference
from vlm_jax.kernels.attention.tpu_backward import _backward
from vlm_jax.kernels.attention.tpu_common import (
    _DEFAULT_BLOCKS,
    _HEAD_BLOCK_VMEM_BUDGET,
    _HEAD_BLOCKS,
    _NN,
    _NT,
    NUM_LANES,
    NUM_SUBLANES,
    Interpret,
    _compiler_params,
    _Config,
    _dot,
    _head,
    _head_specs,
    _kv_block_map,
    _lanes,
    _mask_tables,
    _padded_head_dim,
    _pallas_call,
    _query_tile_mask,
    _round_up,
    _run_blocks,
    _segment_inputs,
    _split_tables,
)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def unsupported_reason(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None = None,
    static_mask: masks.DalleMask | None = None,
) -> str | None:
    """None when `mha` can compute this call, else a short reason (shapes and dtypes only)."""
    return reference.kernel_unsupported_reason(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        static_mask=static_mask,
    )


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
    block_h: int | None = None,
    block_hkv: int | None = None,
    interpret: Interpret = False,
    static_mask: masks.DalleMask | None = None,
) -> jax.Array:
    """Flash attention, q [B, Tq, H, D], k/v [B, Tk, Hkv, D] -> [B, Tq, H, D] (differentiable).

    Args:
      q, k, v: queries, keys, values; one of bfloat16, float16, float32, all the same.
      causal: mask out keys after each query, the queries being the last Tq kv positions.
      segment_ids: [B, Tq] integers; queries attend only to keys of the same segment.
      kv_segment_ids: [B, Tk] segment ids of the keys; defaults to `segment_ids` (needs Tq == Tk).
      sm_scale: logit scale, default head_dim ** -0.5.
      block_q, block_k: tile sizes along the q and kv sequence (forward and backward kernels).
        On a TPU multiples of 128; in interpret mode multiples of 8. Default: the largest of
        512, 384, 256, 128 (256 and less for head_dim > 256) that divides the length rounded up
        to 128.
      block_h: query heads per forward / dq program; it divides the heads, and divides or is a
        multiple of the query heads per kv head (H // Hkv).
      block_hkv: kv heads per dk/dv program; it divides Hkv.
        Default for both: 1, except when each padded sequence is a single block (short sequences
        such as 77 or 197 tokens): then the largest of 8, 6, 4, 3, 2, 1 that fits these rules and keeps
        a program's VMEM (double-buffered blocks + scratch) under 8 MiB, so that a grid step does
        several heads' tiles rather than one (e.g. B256 S197 H12 D64 bf16: 6 and 6; S77 H8: 8, 8).
      interpret: run the kernels in the Pallas interpreter (True, or a `pltpu.InterpretParams`).
      static_mask: a `masks.DalleMask` (causal by itself; causal=True adds nothing). Its block map
        goes to SMEM (scalar prefetch): EMPTY tiles run nothing and their index maps re-point at the
        block already in VMEM (no DMA), PARTIAL tiles apply its predicate, FULL tiles no mask.

    Raises:
      ValueError: when `unsupported_reason` gives a reason, or for bad block sizes or head blocks.
    """
    reason = unsupported_reason(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        static_mask=static_mask,
    )
    if reason is not None:
        raise ValueError(f"pallas_tpu.mha cannot do this call: {reason}")
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = float(d**-0.5 if sm_scale is None else sm_scale)
    out_dtype = q.dtype
    compute_dtype = jnp.float32 if q.dtype == jnp.float16 else q.dtype
    align = NUM_SUBLANES if interpret else NUM_LANES
    dp = _padded_head_dim(d)
    bq = _block_size(tq, block_q, align, d, "block_q")
    bk = _block_size(tk, block_k, align, d, "block_k")
    tqp, tkp = _round_up(tq, bq), _round_up(tk, bk)
    groups = h // hkv
    one_tile = tqp == bq and tkp == bk  # short sequences: several heads per program by default
    itemsize = jnp.dtype(compute_dtype).itemsize
    block_h = _head_block(
        block_h, h, groups, one_tile,
        lambda n: _vmem_bytes("fwd_dq", n, groups, bq, bk, dp, itemsize), "block_h", "query heads",
    )
    block_hkv = _head_block(
        block_hkv, hkv, 1, one_tile,
        lambda n: _vmem_bytes("dkv", n, groups, bq, bk, dp, itemsize), "block_hkv", "kv heads",
    )

    def to_kernel_layout(x: jax.Array, length: int) -> jax.Array:
        x = jnp.swapaxes(x.astype(compute_dtype), 1, 2)  # [B, heads, T, D]
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, dp - d)))

    qt, kt, vt = to_kernel_layout(q, tqp), to_kernel_layout(k, tkp), to_kernel_layout(v, tkp)
    q_seg = kv_seg = None
    if segment_ids is not None:
        kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        q_seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tqp - tq)))
        kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, tkp - tk)))
    cfg = _Config(
        causal=bool(causal) and static_mask is None,
        sm_scale=scale,
        block_q=bq,
        block_k=bk,
        q_len=tq,
        kv_len=tk,
        groups=groups,
        interpret=interpret,
        block_h=block_h,
        block_hkv=block_hkv,
        mask=static_mask,
    )
    out = _flash(qt, kt, vt, q_seg, kv_seg, cfg)  # [B, H, tqp, dp]
    return jnp.swapaxes(out[:, :, :tq, :d], 1, 2).astype(out_dtype)


def _block_size(length: int, requested: int | None, align: int, head_dim: int, name: str) -> int:
    """Tile size along a sequence: requested (checked) or the default for this length."""
    padded = _round_up(length, align)
    if requested is not None:
        if requested <= 0 or requested % align:
            raise ValueError(f"{name}={requested} must be a positive multiple of {align}")
        return min(requested, padded)  # Never pad a short sequence up to a big block.
    candidates = [c for c in _DEFAULT_BLOCKS if head_dim <= 256 or c <= 256]
    padded = _round_up(length, NUM_LANES)
    return next((c for c in candidates if padded % c == 0), NUM_LANES)


def _head_block(
    requested: int | None, heads: int, groups: int, one_tile: bool, vmem: Callable[[int], int],
    name: str, what: str,
) -> int:
    """Heads per program: `requested` (checked), else the default (module docstring, "Kernels").

    A block of query heads (groups > 1) must share one kv head or span whole kv heads: it divides
    `groups` or is a multiple of it. `vmem(n)` estimates the VMEM of a program with n heads.
    """

    def fits(n: int) -> bool:
        return heads % n == 0 and (groups % n == 0 or n % groups == 0)

    if requested is not None:
        if requested < 1 or not fits(requested):
            rule = f"divide the {heads} {what}"
            if groups > 1:
                rule += f" and divide or be a multiple of the {groups} query heads per kv head"
            raise ValueError(f"{name}={requested} must {rule}")
        return int(requested)
    if not one_tile:
        return 1
    return next(n for n in _HEAD_BLOCKS if fits(n) and (n == 1 or vmem(n) <= _HEAD_BLOCK_VMEM_BUDGET))


def _vmem_bytes(kernel: str, heads: int, groups: int, bq: int, bk: int, dp: int, itemsize: int) -> int:
    """Rough VMEM of one program with `heads` heads: its blocks, double-buffered by the Pallas
    pipeline, plus the fp32 scratch. `kernel` is "fwd_dq" (the larger of the forward and dq
    programs, `heads` query heads) or "dkv" (`heads` kv heads). Tiles are counted at 128 lanes (a
    head dim of 64 still takes 128 in VMEM); the [bq, bk] fp32 score temporaries are left to the
    budget's slack."""
    lanes = _round_up(dp, NUM_LANES)
    q_tile, kv_tile = bq * lanes * itemsize, bk * lanes * itemsize
    seg_ids = (bq + bk) * NUM_LANES * 4  # an upper bound for the [rows, 128] and [8, cols] id tiles
    if kernel == "fwd_dq":
        kv_heads = max(heads // groups, 1)
        # Per query head q, o (forward) or q, do, dq (dq), and the fp32 logsumexp [bq, 128]; scratch:
        # the forward's running max, sum [bq, 128] and output accumulator.
        blocks = heads * (3 * q_tile + bq * NUM_LANES * 4) + kv_heads * 2 * kv_tile + seg_ids
        scratch = heads * (2 * bq * NUM_LANES + bq * lanes) * 4
    else:
        # Per kv head k, v, dk, dv, then q, do and the logsumexp / di rows ([8, bq] fp32 tiles) of
        # one query head of its group; scratch: the dk and dv accumulators.
        blocks = heads * (4 * kv_tile + 2 * q_tile + 2 * NUM_SUBLANES * bq * 4) + seg_ids
        scratch = heads * 2 * bk * lanes * 4
    return 2 * blocks + scratch


# --------------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------------


def _fwd_kernel(*refs: Any, cfg: _Config, segments: bool, kv_bound: bool) -> None:
    tables, refs = _split_tables(refs, cfg)
    if segments:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
        qs_ref = ks_ref = None
    bk, dp = cfg.block_k, q_ref.shape[-1]
    nh, nkv, g = cfg.block_h, cfg.kv_heads_per_block, cfg.groups
    i, j, nk = pl.program_id(2), pl.program_id(3), pl.num_programs(3)

    @pl.when(j == 0)
    def _init() -> None:
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def step(masked: bool) -> None:
        mask = _query_tile_mask(i, j, qs_ref, ks_ref, cfg, kv_bound) if masked else None  # all heads'
        for hh in range(nh):  # the program's query heads, one after another
            m_h, l_h, acc_h = (_head(r, hh, nh) for r in (m_scr, l_scr, acc_scr))
            v_h = _head(v_ref, hh // g, nkv)
            s = _dot(_head(q_ref, hh, nh)[...], _head(k_ref, hh // g, nkv)[...], _NT) * cfg.sm_scale
            if masked:
                s = jnp.where(mask, s, -jnp.inf)  # [bq, bk]
            m_prev, l_prev = m_h[...], l_h[...]  # [bq, 128], equal along lanes
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            # A row with every key masked so far keeps m = -inf; subtract 0 there (p = exp(-inf) = 0).
            m_sub = jnp.where(m_next == -jnp.inf, 0.0, m_next) if masked else m_next
            p = jnp.exp(s - _lanes(m_sub, bk))
            alpha = jnp.exp(m_prev - m_sub)  # 0 on a row's first visible tile
            l_h[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            m_h[...] = m_next
            pv = _dot(p.astype(v_h.dtype), v_h[...], _NN)
            acc_h[...] = acc_h[...] * _lanes(alpha, dp) + pv

    _run_blocks(i, j, cfg, segments, kv_bound, j == nk - 1, step, tables)

    @pl.when(j == nk - 1)
    def _finish() -> None:
        for hh in range(nh):
            total = _head(l_scr, hh, nh)[...]
            empty = total == 0.0  # no visible key: output 0, logsumexp +inf (so the backward p is 0)
            inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, total))
            o_h = _head(o_ref, hh, nh)
            o_h[...] = (_head(acc_scr, hh, nh)[...] * _lanes(inv, dp)).astype(o_h.dtype)
            lse = _head(m_scr, hh, nh)[...] + jnp.log(jnp.where(empty, 1.0, total))
            _head(lse_ref, hh, nh)[...] = jnp.where(empty, jnp.inf, lse)


def _forward(
    q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
    cfg: _Config,
) -> tuple[jax.Array, jax.Array]:
    """Kernel layout q [B, H, Tqp, D], k/v [B, Hkv, Tkp, D] -> (out like q, logsumexp [B, H, Tqp])."""
    b, h, tqp, dp = q.shape
    tkp = k.shape[2]
    bq, bk, nh = cfg.block_q, cfg.block_k, cfg.block_h
    nq, nk = tqp // bq, tkp // bk
    segments = q_seg is not None
    kv_bound = tkp > cfg.kv_len and not cfg.causal  # causal already hides the padded keys

    kv_block = _kv_block_map(cfg, nk)
    q_spec, kv_spec, _ = _head_specs(cfg, dp, kv_block)
    seg_specs, seg_args = _segment_inputs(cfg, kv_block, q_seg, kv_seg)
    in_specs = [q_spec, kv_spec, kv_spec, *seg_specs]
    args = [q, k, v, *seg_args]
    heads = None if nh == 1 else nh
    out_specs = [
        q_spec,
        pl.BlockSpec((None, heads, bq, NUM_LANES), lambda b_, h_, i, j, *_: (b_, h_, i, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, h, tqp, NUM_LANES), jnp.float32),
    ]
    head_axis = () if nh == 1 else (nh,)  # scratch: one set per head of the program
    itemsize = jnp.dtype(q.dtype).itemsize
    visible_frac, tables = _mask_tables(cfg, nq, nk)
    cost = pl.CostEstimate(
        flops=int(4 * b * h * tqp * tkp * dp * visible_frac),
        transcendentals=int(b * h * tqp * tkp * visible_frac),
        bytes_accessed=int(itemsize * (2 * q.size + nq * (k.size + v.size)) + 4 * b * h * tqp),
    )
    out, lse = _pallas_call(
        cfg, tables[:2],
        functools.partial(_fwd_kernel, cfg=cfg, segments=segments, kv_bound=kv_bound),
        grid=(b, h // nh, nq, nk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[
            pltpu.VMEM((*head_axis, bq, NUM_LANES), jnp.float32),  # running max
            pltpu.VMEM((*head_axis, bq, NUM_LANES), jnp.float32),  # running sum
            pltpu.VMEM((*head_axis, bq, dp), jnp.float32),  # output accumulator
        ],
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*args)
    return out, lse[..., 0]


# --------------------------------------------------------------------------------------------
# custom_vjp plumbing (kernel layout)
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(
    q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
    cfg: _Config,
) -> jax.Array:
    return _forward(q, k, v, q_seg, kv_seg, cfg)[0]


def _flash_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
    cfg: _Config,
) -> tuple[jax.Array, tuple[Any, ...]]:
    out, lse = _forward(q, k, v, q_seg, kv_seg, cfg)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg: _Config, res: tuple[Any, ...], do: jax.Array) -> tuple[Any, ...]:
    q, k, v, q_seg, kv_seg, out, lse = res
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, out, lse, do, cfg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


__all__ = ["mha", "unsupported_reason", "NUM_LANES", "NUM_SUBLANES"]
