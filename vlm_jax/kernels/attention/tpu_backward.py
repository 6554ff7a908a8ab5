"""The backward kernels of the Pallas TPU flash attention (`pallas_tpu.py`): dq and dk/dv.

dq: grid (B, H / block_h, q blocks, kv blocks), recomputing the probabilities from the forward's
logsumexp; dk/dv: grid (B, Hkv / block_hkv, kv blocks, group, q blocks) on transposed scores,
summing the group's query heads in VMEM. Skipped tiles (causal, or EMPTY in a static mask's block
map) run nothing and re-use the block already in VMEM.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vlm_jax.kernels.attention.tpu_common import (
    _NN,
    _NT,
    NUM_LANES,
    NUM_SUBLANES,
    _compiler_params,
    _Config,
    _dot,
    _first_visible_q_block,
    _head,
    _head_specs,
    _kv_block_map,
    _lanes_ids,
    _mask,
    _mask_tables,
    _pallas_call,
    _query_tile_mask,
    _run_blocks,
    _segment_inputs,
    _split_tables,
    _sublanes_ids,
)


# --------------------------------------------------------------------------------------------
# Backward kernels
# --------------------------------------------------------------------------------------------


def _dq_kernel(*refs: Any, cfg: _Config, segments: bool, kv_bound: bool) -> None:
    tables, refs = _split_tables(refs, cfg)
    if segments:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, lse_ref, di_ref, do_ref, dq_ref, dq_scr = refs
    else:
        q_ref, k_ref, v_ref, lse_ref, di_ref, do_ref, dq_ref, dq_scr = refs
        qs_ref = ks_ref = None
    nh, nkv, g = cfg.block_h, cfg.kv_heads_per_block, cfg.groups
    i, j, nk = pl.program_id(2), pl.program_id(3), pl.num_programs(3)

    @pl.when(j == 0)
    def _init() -> None:
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def step(masked: bool) -> None:
        mask = _query_tile_mask(i, j, qs_ref, ks_ref, cfg, kv_bound) if masked else None  # all heads'
        for hh in range(nh):  # the program's query heads, one after another
            k = _head(k_ref, hh // g, nkv)[...]
            s = _dot(_head(q_ref, hh, nh)[...], k, _NT) * cfg.sm_scale  # [bq, bk]
            if masked:
                s = jnp.where(mask, s, -jnp.inf)
            lse = _head(lse_ref, hh, nh)[0][:, None]  # [bq, 1]: row -> column
            di = _head(di_ref, hh, nh)[0][:, None]
            p = jnp.exp(s - lse)
            dp_ = _dot(_head(do_ref, hh, nh)[...], _head(v_ref, hh // g, nkv)[...], _NT)  # [bq, bk]
            ds = p * (dp_ - di)
            dq_h = _head(dq_scr, hh, nh)
            dq_h[...] += _dot(ds.astype(k.dtype), k, _NN)

    _run_blocks(i, j, cfg, segments, kv_bound, j == nk - 1, step, tables)

    @pl.when(j == nk - 1)
    def _finish() -> None:
        dq_ref[...] = (dq_scr[...] * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs: Any, cfg: _Config, segments: bool, kv_bound: bool) -> None:
    tables, refs = _split_tables(refs, cfg)
    if segments:
        (q_ref, k_ref, v_ref, qs_ref, ks_ref, lse_ref, di_ref, do_ref,
         dk_ref, dv_ref, dk_scr, dv_scr) = refs
    else:
        q_ref, k_ref, v_ref, lse_ref, di_ref, do_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
        qs_ref = ks_ref = None
    bq, bk, nkv = cfg.block_q, cfg.block_k, cfg.block_hkv
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    ng, nq = pl.num_programs(3), pl.num_programs(4)

    @pl.when(jnp.logical_and(g == 0, i == 0))
    def _init() -> None:
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def step(masked: bool) -> None:
        mask = None
        if masked:  # one mask for all the program's kv heads
            mask = _mask(
                (j * bk, bk),
                (i * bq, bq),
                1,
                None if ks_ref is None else ks_ref[...],
                None if qs_ref is None else qs_ref[:1, :],
                cfg,
                kv_bound,
            )
        for c in range(nkv):  # the program's kv heads (each with query head g of its group)
            q, do = _head(q_ref, c, nkv)[...], _head(do_ref, c, nkv)[...]
            s = _dot(_head(k_ref, c, nkv)[...], q, _NT) * cfg.sm_scale  # transposed scores [bk, bq]
            if masked:
                s = jnp.where(mask, s, -jnp.inf)
            p = jnp.exp(s - _head(lse_ref, c, nkv)[...])  # lse row [1, bq] broadcasts over kv rows
            dv_h, dk_h = _head(dv_scr, c, nkv), _head(dk_scr, c, nkv)
            dv_h[...] += _dot(p.astype(do.dtype), do, _NN)
            dp_ = _dot(_head(v_ref, c, nkv)[...], do, _NT)  # [bk, bq]
            ds = p * (dp_ - _head(di_ref, c, nkv)[...])
            dk_h[...] += _dot(ds.astype(q.dtype), q, _NN)

    _run_blocks(i, j, cfg, segments, kv_bound, j == pl.num_programs(2) - 1, step, tables)

    @pl.when(jnp.logical_and(g == ng - 1, i == nq - 1))
    def _finish() -> None:
        dk_ref[...] = (dk_scr[...] * cfg.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward(
    q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
    out: jax.Array, lse: jax.Array, do: jax.Array, cfg: _Config,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients (dq, dk, dv) in kernel layout from the forward residuals and the cotangent `do`."""
    b, h, tqp, dp = q.shape
    hkv, tkp = k.shape[1], k.shape[2]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    nh, nkv = cfg.block_h, cfg.block_hkv
    nq, nk = tqp // bq, tkp // bk
    segments = q_seg is not None
    kv_bound = tkp > cfg.kv_len and not cfg.causal
    do = do.astype(q.dtype)
    di = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, Tqp]
    lse_rows, di_rows = lse[:, :, None, :], di[:, :, None, :]  # [B, H, 1, Tqp]
    itemsize = jnp.dtype(q.dtype).itemsize
    visible_frac, tables = _mask_tables(cfg, nq, nk)
    tile_flops = b * h * tqp * tkp * dp * visible_frac

    # ---- dq: grid (B, H / block_h, q blocks, kv blocks), reduce over kv blocks.
    kv_block = _kv_block_map(cfg, nk)
    q_spec, kv_spec, row_spec = _head_specs(cfg, dp, kv_block)
    seg_specs, seg_args = _segment_inputs(cfg, kv_block, q_seg, kv_seg)
    in_specs = [q_spec, kv_spec, kv_spec, *seg_specs]
    args = [q, k, v, *seg_args]
    in_specs += [row_spec, row_spec, q_spec]
    args += [lse_rows, di_rows, do]
    head_axis = () if nh == 1 else (nh,)
    dq = _pallas_call(
        cfg, tables[:2],
        functools.partial(_dq_kernel, cfg=cfg, segments=segments, kv_bound=kv_bound),
        grid=(b, h // nh, nq, nk),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((*head_axis, bq, dp), jnp.float32)],
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=int(6 * tile_flops),
            transcendentals=int(tile_flops / dp),
            bytes_accessed=int(itemsize * (3 * q.size + nq * (k.size + v.size))),
        ),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(*args)

    # ---- dk/dv: grid (B, Hkv / block_hkv, kv blocks, group, q blocks), reduce over the group's
    # heads and q. The query-side arrays are viewed as [B, Hkv, group, ...] (a free reshape) so that
    # a block can hold query head g_ of block_hkv consecutive kv heads.
    def q_block(j: Any, i: Any, *tables: Any) -> Any:
        # Invisible causal tiles re-use the first visible q block: no new DMA for skipped steps.
        if cfg.mask is not None:
            return tables[1][j * nq + i]
        return jnp.maximum(i, _first_visible_q_block(j, cfg, nq)) if cfg.causal else i

    def grouped(x: jax.Array) -> jax.Array:  # [B, H, ...] -> [B, Hkv, group, ...]
        return x.reshape(b, hkv, g, *x.shape[2:])

    heads = None if nkv == 1 else nkv
    qd_spec = pl.BlockSpec(
        (None, heads, None, bq, dp), lambda b_, hk, j, g_, i, *_: (b_, hk, g_, q_block(j, i, *_), 0)
    )
    kvd_spec = pl.BlockSpec((None, heads, bk, dp), lambda b_, hk, j, g_, i, *_: (b_, hk, j, 0))
    rowd_spec = pl.BlockSpec(
        (None, heads, None, 1, bq), lambda b_, hk, j, g_, i, *_: (b_, hk, g_, 0, q_block(j, i, *_))
    )
    in_specs = [qd_spec, kvd_spec, kvd_spec]
    args = [grouped(q), k, v]
    if segments:
        in_specs += [
            pl.BlockSpec((None, NUM_SUBLANES, bq), lambda b_, hk, j, g_, i, *_: (b_, 0, q_block(j, i, *_))),
            pl.BlockSpec((None, bk, NUM_LANES), lambda b_, hk, j, g_, i, *_: (b_, j, 0)),
        ]
        args += [_sublanes_ids(q_seg), _lanes_ids(kv_seg)]
    in_specs += [rowd_spec, rowd_spec, qd_spec]
    args += [grouped(lse_rows), grouped(di_rows), grouped(do)]
    head_axis = () if nkv == 1 else (nkv,)
    dk, dv = _pallas_call(
        cfg, tables[0::2],  # block map, dk/dv q fetch
        functools.partial(_dkv_kernel, cfg=cfg, segments=segments, kv_bound=kv_bound),
        grid=(b, hkv // nkv, nk, g, nq),
        in_specs=in_specs,
        out_specs=[kvd_spec, kvd_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[
            pltpu.VMEM((*head_axis, bk, dp), jnp.float32),  # dk accumulator
            pltpu.VMEM((*head_axis, bk, dp), jnp.float32),  # dv accumulator
        ],
        compiler_params=_compiler_params(
            ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=int(8 * tile_flops),
            transcendentals=int(tile_flops / dp),
            bytes_accessed=int(itemsize * (2 * k.size + 2 * v.size + nk * 2 * q.size)),
        ),
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(*args)
    return dq, dk, dv
