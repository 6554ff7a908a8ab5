"""The backward kernels of the Pallas GPU flash attention (`pallas_gpu.py`): dq, and dk/dv.

dq: grid (q blocks, batch, head blocks) streaming key tiles, as the forward. dk/dv: grid (kv
blocks, batch, kv heads) streaming the query tiles of every query head of the group, so that
grouped-query gradients are summed in registers; no atomics. delta = rowsum(out * dout) is one
fused XLA reduction before them. A static mask's schedule drives both walks (`masks.kv_schedule`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vlm_jax.kernels.attention.gpu_common import (
    _LOG2E,
    _MASKED,
    _fori,
    _head_specs,
    _mask_logits,
    _pallas,
    _pop_schedule,
    _q_block_index,
    _query_tile,
    _query_tile_inputs,
    _schedule,
    _Static,
    _dot,
)

# --------------------------------------------------------------------------------------------
# Backward: dq.


def _dq_kernel(*refs: Any, st: _Static, segments: bool, n_q_blocks: int) -> None:
    refs, sched_ref = _pop_schedule(refs, 1, st)
    if segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, dq_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        q_ids_ref = kv_ids_ref = None
    bq, bk = st.tiles.block_q_dq, st.tiles.block_k_dq
    heads, full, end, tile = _query_tile(st, k_ref, v_ref, q_ids_ref, kv_ids_ref, bq, bk, n_q_blocks, sched_ref)

    for hh in range(st.tiles.block_h):  # the program's query heads, one after another
        q, do = heads.q(q_ref, hh), heads.q(do_ref, hh)
        lse, delta = heads.row(lse_ref, hh), heads.row(delta_ref, hh)

        def body(j: jax.Array, dq: jax.Array, masked: bool, q=q, do=do, lse=lse, delta=delta, hh=hh) -> jax.Array:
            k, v, s, valid = tile(q, hh, j, masked)
            p = jnp.exp2(s - lse[:, None])
            ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
            if valid is not None:  # masked logits get no gradient (matters for rows with no valid key)
                ds = jnp.where(valid, ds, 0.0)
            return dq + _dot(ds.astype(k.dtype), k)

        dq = jnp.zeros(q.shape, jnp.float32)
        dq = _fori(0, full, functools.partial(body, masked=False), dq)
        dq = _fori(full, end, functools.partial(body, masked=True), dq)
        heads.store_q(dq_ref, hh, (dq * st.sm_scale).astype(dq_ref.dtype))


# --------------------------------------------------------------------------------------------
# Backward: dk, dv.


def _dkv_kernel(*refs: Any, st: _Static, segments: bool) -> None:
    refs, sched_ref = _pop_schedule(refs, 2, st)
    if segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref, dk_ref, dv_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
        q_ids_ref = kv_ids_ref = None
    bq, bk = st.tiles.block_q_dkv, st.tiles.block_k_dkv
    kj = pl.program_id(0)
    k = k_ref[...]
    v = v_ref[...]
    kv_start = kj * bk
    kv_pos = kv_start + jnp.arange(bk, dtype=jnp.int32)
    kv_ids = kv_ids_ref[...] if segments else None
    scale = st.sm_scale * _LOG2E
    n_q = pl.cdiv(st.q_len, bq)

    # Query tiles this key tile is visible from: [lo, full) need the causal mask, [full, n_q) not.
    # Padded keys need no mask here: their dk/dv rows are sliced off and nothing else reads them.
    if st.causal:
        lo = jnp.minimum(lax.div(jnp.maximum(kv_start - st.offset, 0), bq), n_q)
        full = lax.div(jnp.maximum(kv_start + bk - 1 - st.offset, 0) + bq - 1, bq)
        full = jnp.maximum(jnp.minimum(full, n_q), lo)
    else:
        lo, full = 0, 0
    if segments:
        full = n_q
    walk = lambda i: i  # noqa: E731  (loop step -> query tile)
    if st.mask is not None:  # the schedule: FULL tiles unmasked, then PARTIAL ones masked
        walk = lambda t: sched_ref[2 + t]  # noqa: E731

    def body(i: jax.Array, carry: Any, group: Any, masked: bool) -> Any:
        dk, dv = carry
        start = pl.multiple_of(walk(i) * bq, bq)
        q = q_ref[pl.ds(start, bq), group, :]
        do = do_ref[pl.ds(start, bq), group, :]
        lse = lse_ref[group, pl.ds(start, bq)]
        delta = delta_ref[group, pl.ds(start, bq)]
        s_t = _dot(k, q, trans_b=True) * scale  # [bk, bq]: logits transposed
        valid = None
        if masked:
            s_t, valid = _mask_logits(
                s_t,
                q_pos=start + st.offset + jnp.arange(bq, dtype=jnp.int32) if st.causal or st.mask else None,
                kv_pos=kv_pos,
                q_ids=q_ids_ref[pl.ds(start, bq)] if segments else None,
                kv_ids=kv_ids,
                kv_len=None,
                transposed=True,
                allowed=st.mask.allowed if st.mask is not None else None,
            )
            if segments:
                # A query with no visible key ("dead" row, only possible with segment ids) got the
                # mean of the values: p = 1 / kv_len on every key. Its lse (about _MASKED) cannot
                # carry log2(kv_len) in float32, so rebuild p from it here.
                dead = lse < 0.5 * _MASKED
                lse = jnp.where(dead, math.log2(st.kv_len), lse)
                s_t = jnp.where(valid, s_t, jnp.where(dead, 0.0, _MASKED)[None, :])
        p_t = jnp.exp2(s_t - lse[None, :])
        dv = dv + _dot(p_t.astype(do.dtype), do)
        ds_t = p_t * (_dot(v, do, trans_b=True) - delta[None, :])
        if valid is not None:
            ds_t = jnp.where(valid, ds_t, 0.0)
        dk = dk + _dot(ds_t.astype(q.dtype), q)
        return dk, dv

    def one_group(group: Any, carry: Any) -> Any:
        if st.mask is not None:
            carry = _fori(0, sched_ref[0], functools.partial(body, group=group, masked=False), carry)
            return _fori(sched_ref[0], sched_ref[1], functools.partial(body, group=group, masked=True), carry)
        carry = _fori(lo, full, functools.partial(body, group=group, masked=True), carry)
        return _fori(full, n_q, functools.partial(body, group=group, masked=False), carry)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if st.groups == 1:
        carry = one_group(0, carry)
    else:
        carry = lax.fori_loop(0, st.groups, one_group, carry)
    dk, dv = carry
    dk_ref[...] = (dk * st.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_kernels(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_ids: jax.Array | None,
    kv_ids: jax.Array | None,
    out: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    st: _Static,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = st.groups
    segments = q_ids is not None
    t = st.tiles
    # delta_i = sum_d out_id * dout_id = sum_j p_ij dp_ij: one fused XLA reduction.
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))

    # dq: grid over query tiles (and blocks of t.block_h query heads).
    bq = t.block_q_dq
    n_q = tq // bq
    qb = _q_block_index(st, n_q)
    q_spec, kv_spec, row_spec = _head_specs(st, bq, tk, d, qb)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [q, k, v, do, lse, delta]
    more_specs, more_args = _query_tile_inputs(st, bq, t.block_k_dq, tq, tk, qb, q_ids, kv_ids)
    in_specs += more_specs
    args += more_args
    (dq,) = _pallas(
        functools.partial(_dq_kernel, st=st, segments=segments, n_q_blocks=n_q),
        grid=(n_q, b, h // t.block_h),
        in_specs=in_specs,
        out_specs=[q_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        args=args,
        st=st,
        num_warps=t.num_warps_bwd,
        num_stages=t.num_stages_bwd,
        name="flash_attention_dq",
    )

    # dk, dv: grid over key tiles of each kv head; the kernel loops over the group's query heads.
    bk = t.block_k_dkv
    q_spec = pl.BlockSpec((None, tq, g, d), lambda j, bi, hi: (bi, 0, hi, 0))
    kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, bi, hi: (bi, j, hi, 0))
    row_spec = pl.BlockSpec((None, g, tq), lambda j, bi, hi: (bi, hi, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [q, k, v, do, lse, delta]
    if segments:
        in_specs += [
            pl.BlockSpec((None, tq), lambda j, bi, hi: (bi, 0)),
            pl.BlockSpec((None, bk), lambda j, bi, hi: (bi, j)),
        ]
        args += [q_ids, kv_ids]
    if st.mask is not None:
        sched = _schedule(st, t.block_q_dkv, bk, tq, tk, segments, by_kv=True)
        in_specs.append(pl.BlockSpec((None, sched.shape[1]), lambda j, bi, hi: (j, 0)))
        args.append(sched)
    dk, dv = _pallas(
        functools.partial(_dkv_kernel, st=st, segments=segments),
        grid=(tk // bk, b, hkv),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        args=args,
        st=st,
        num_warps=t.num_warps_bwd,
        num_stages=t.num_stages_bwd,
        name="flash_attention_dkv",
    )
    return dq, dk, dv
