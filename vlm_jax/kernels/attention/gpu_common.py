"""Building blocks of the Pallas GPU (Triton) flash-attention kernels of `pallas_gpu.py`.

Tile sizes (`Tiles`, `default_tiles`, `short_tiles`), the static parameters the kernels specialise
on (`_Static`), logit masking, the walk of one query tile over its key tiles (causal ranges, or a
static mask's schedule), the BlockSpecs of the forward / dq grids and the pallas_call wrapper. The
algorithm and its conventions are described in `pallas_gpu`'s docstring.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from vlm_jax.kernels.attention import masks

# The Triton compiler-params class was `TritonCompilerParams` before it became `CompilerParams`.
_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")

MAX_HEAD_DIM = 256
MIN_BLOCK = 16  # tl.dot needs every matmul dimension >= 16.

_LOG2E = math.log2(math.e)
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # causal/segment-masked logit (finite)
_PADDED = float("-inf")  # logit of a padded key: never contributes
_M_INIT = float(jnp.finfo(jnp.float32).min)  # running max before any key: below _MASKED, finite


@dataclass(frozen=True)
class Tiles:
    """Tile sizes (powers of two >= 16) and Triton launch parameters of the three kernels."""

    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int
    block_h: int = 1  # query heads per forward / dq program


# Short sequences (both lengths padded to <= this): whole rows per tile, several heads per program.
SHORT_LEN = 256


def short_tiles(head_dim: int, dtype: Any, q_len: int, kv_len: int, heads: int, groups: int) -> Tiles | None:
    """Tiles for short sequences (ViT's 197 tokens, CLIP text's 77), None for longer ones.

    A long-sequence tiling would walk a 197-key row in four 64-key steps with an online softmax and
    launch one program per (query tile, example, head). Here every tile spans the whole (padded)
    row: the forward and dq programs see all keys in one step, the dk/dv programs all queries; and a
    forward / dq program handles `block_h` query heads in turn (the largest of 4, 2 that divides the
    heads and fits the kv groups): a quarter of the programs, each with more work, and heads that
    share a kv head read its tile from L2 after the first. Query tiles are 64 rows (32 for float32
    or head_dim > 64) so that the [rows, keys] float32 logits stay in registers. Not yet measured on
    a GPU: `mha`'s tile arguments override.
    """
    lq, lk = pl.next_power_of_2(max(q_len, MIN_BLOCK)), pl.next_power_of_2(max(kv_len, MIN_BLOCK))
    if max(lq, lk) > SHORT_LEN:
        return None
    d = _padded_head_dim(head_dim)
    big = d > 64 or jnp.dtype(dtype) == jnp.float32
    bq = min(32 if big else 64, lq)
    block_h = next((hb for hb in (4, 2) if heads % hb == 0 and (hb % groups == 0 or groups % hb == 0)), 1)
    return Tiles(
        block_q=bq, block_k=lk, block_q_dkv=lq, block_k_dkv=min(bq, lk), block_q_dq=bq, block_k_dq=lk,
        num_warps=4 if lk <= 128 and not big else 8, num_stages=1,
        num_warps_bwd=8, num_stages_bwd=1, block_h=block_h,
    )


def default_tiles(head_dim: int, dtype: Any) -> Tiles:
    """H100 defaults per (padded) head dim and dtype.

    Forward: 128 query rows x 64 keys for 16-bit D<=128 (the FlashAttention-2 Triton choice; shared
    memory holds q plus num_stages kv tiles). Backward: dk/dv programs own 128 keys and stream 32
    query rows, dq programs own 128 query rows and stream 32 keys (the Triton fused-attention
    tutorial's split). D=256 and float32 (twice the bytes) halve the tiles to stay in shared memory
    and registers. Not autotuned here: pass explicit sizes to `mha` to tune.
    """
    d = _padded_head_dim(head_dim)
    if d <= 64:
        tiles = dict(fwd=(128, 64), dkv=(32, 128), dq=(128, 32), warps=(4, 4), stages=(3, 3))
    elif d <= 128:
        tiles = dict(fwd=(128, 64), dkv=(32, 128), dq=(128, 32), warps=(8, 8), stages=(3, 2))
    else:
        tiles = dict(fwd=(64, 32), dkv=(32, 64), dq=(64, 32), warps=(8, 8), stages=(2, 1))
    if jnp.dtype(dtype) == jnp.float32:
        tiles["fwd"] = tuple(max(MIN_BLOCK, b // 2) for b in tiles["fwd"])
        tiles["dkv"] = tuple(max(MIN_BLOCK, b // 2) for b in tiles["dkv"])
        tiles["dq"] = tuple(max(MIN_BLOCK, b // 2) for b in tiles["dq"])
        tiles["stages"] = (2, min(2, tiles["stages"][1]))
    return Tiles(
        *tiles["fwd"], *tiles["dkv"], *tiles["dq"],
        num_warps=tiles["warps"][0], num_stages=tiles["stages"][0],
        num_warps_bwd=tiles["warps"][1], num_stages_bwd=tiles["stages"][1],
    )


@dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable: the custom_vjp's non-differentiable arg)."""

    causal: bool
    sm_scale: float
    q_len: int  # true lengths; the arrays the kernels see are padded
    kv_len: int
    groups: int  # query heads per kv head
    tiles: Tiles
    interpret: bool
    poison: bool
    mask: masks.DalleMask | None = None  # static mask: causal is False, the mask holds causality

    @property
    def offset(self) -> int:
        """Position of query row 0 in the kv sequence (causal: queries are the last q_len keys)."""
        return self.kv_len - self.q_len


def _padded_head_dim(head_dim: int) -> int:
    return max(MIN_BLOCK, pl.next_power_of_2(head_dim))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _clamp_block(block: int, length: int) -> int:
    """A power of two >= 16, no larger than needed for `length`."""
    if block < MIN_BLOCK or block & (block - 1):
        raise ValueError(f"block sizes must be powers of two >= {MIN_BLOCK}, got {block}")
    return min(block, max(MIN_BLOCK, pl.next_power_of_2(length)))


# --------------------------------------------------------------------------------------------
# Kernel building blocks.


def _dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """a @ b (or a @ b.T) with float32 accumulation; lowers to tl.dot."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _mask_logits(
    s: jax.Array,
    *,
    q_pos: jax.Array | None,
    kv_pos: jax.Array,
    q_ids: jax.Array | None,
    kv_ids: jax.Array | None,
    kv_len: int | None,
    transposed: bool = False,
    allowed: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Mask logits s [rows, cols] (transposed: rows are keys). Returns (masked s, the causal/segment
    validity or None). q_pos given: the causal mask, or allowed(q_pos, kv_pos) (a static mask's
    predicate). Keys at positions >= kv_len (padding) get -inf; kv_len None: no padding."""

    def outer(a: jax.Array, b: jax.Array, op: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
        # a indexes queries, b keys; the result is laid out like s.
        return op(a[None, :], b[:, None]) if transposed else op(a[:, None], b[None, :])

    valid = None
    if q_pos is not None:
        valid = outer(q_pos, kv_pos, allowed or (lambda qp, kp: kp <= qp))
    if q_ids is not None:
        same = outer(q_ids, kv_ids, lambda a, b: a == b)
        valid = same if valid is None else jnp.logical_and(valid, same)
    if valid is not None:
        s = jnp.where(valid, s, _MASKED)
    if kv_len is not None:
        in_range = (kv_pos[:, None] if transposed else kv_pos[None, :]) < kv_len
        s = jnp.where(in_range, s, _PADDED)
    return s, valid


def _causal_kv_range(st: _Static, q_block: jax.Array, bq: int, bk: int, segments: bool):
    """Key tiles a query tile visits: [0, full) need no causal mask, [full, end) need the mask.

    Without causal, every tile is visited and only the tail tile (or all, with segment ids) is
    masked. Bounds are ints when static, traced int32 otherwise.
    """
    n_kv = pl.cdiv(st.kv_len, bk)
    tail = st.kv_len % bk != 0
    if not st.causal:
        full = 0 if segments else st.kv_len // bk
        return full, n_kv
    first_row = q_block * bq + st.offset  # kv position of the tile's first query row
    end = jnp.minimum(n_kv, lax.div(first_row + bq - 1, bk) + 1)
    if segments:
        return 0, end
    full = lax.div(first_row + 1, bk)  # tiles whose last key <= the first query's position
    if tail:
        full = jnp.minimum(full, st.kv_len // bk)
    return jnp.minimum(full, end), end


def _fori(lo: Any, hi: Any, body: Callable[[Any, Any], Any], carry: Any) -> Any:
    """fori_loop that drops statically empty ranges."""
    if isinstance(lo, int) and isinstance(hi, int) and lo >= hi:
        return carry
    return lax.fori_loop(lo, hi, body, carry)


def _schedule(st: _Static, bq: int, bk: int, tq: int, tk: int, segments: bool, by_kv: bool) -> jax.Array:
    """A static mask's tile schedule (masks.kv_schedule) for padded lengths tq, tk and tiles bq x bk:
    one row per query tile (forward, dq) or, by_kv, per key tile (dk/dv); with segment ids every
    visited tile is masked."""
    assert st.mask is not None
    bmap = st.mask.block_map(bq, bk, st.q_len, st.kv_len, q_tiles=tq // bq, k_tiles=tk // bk)
    return jnp.asarray(masks.kv_schedule(bmap.T if by_kv else bmap, all_masked=segments))


def _query_tile_inputs(
    st: _Static, bq: int, bk: int, tq: int, tk: int, qb: Callable[[Any], Any], q_ids: Any, kv_ids: Any
) -> tuple[list[Any], list[Any]]:
    """(BlockSpecs, arrays) a forward or dq pallas_call passes after its own inputs: the segment
    ids of the query tile and of every key (when given), then a static mask's schedule row."""
    specs: list[Any] = []
    args: list[Any] = []
    if q_ids is not None:
        specs += [
            pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, qb(i))),
            pl.BlockSpec((None, tk), lambda i, bi, hi: (bi, 0)),
        ]
        args += [q_ids, kv_ids]
    if st.mask is not None:
        sched = _schedule(st, bq, bk, tq, tk, q_ids is not None, by_kv=False)
        specs.append(pl.BlockSpec((None, sched.shape[1]), lambda i, bi, hi: (qb(i), 0)))
        args.append(sched)
    return specs, args


def _pop_schedule(refs: tuple[Any, ...], n_out: int, st: _Static) -> tuple[tuple[Any, ...], Any]:
    """(refs without the schedule, the schedule ref or None): with a static mask the schedule is
    the last input, just before the n_out outputs."""
    if st.mask is None:
        return refs, None
    return refs[: -n_out - 1] + refs[-n_out:], refs[-n_out - 1]


def _q_block_index(st: _Static, n_q_blocks: int) -> Callable[[jax.Array], jax.Array]:
    """Grid index -> query tile. Causal, and the static masks (all causal), run the heaviest (last)
    query tiles first."""
    if st.causal or st.mask is not None:
        return lambda i: n_q_blocks - 1 - i
    return lambda i: i


@dataclass(frozen=True)
class _Heads:
    """Access to query head `hh` of a program that holds st.tiles.block_h of them.

    With one head per program the refs are squeezed by their BlockSpecs ([rows, D], per-row
    [rows]); with several they keep a head axis ([rows, block_h, D], per-row [block_h, rows]), and
    k/v keep one when the block spans several kv heads: query head hh reads kv head hh // groups.
    """

    block_h: int
    groups: int

    def q(self, ref: Any, hh: int) -> jax.Array:  # q, do: [rows, D]
        return ref[...] if self.block_h == 1 else ref[:, hh, :]

    def row(self, ref: Any, hh: int) -> jax.Array:  # lse, delta: [rows]
        return ref[...] if self.block_h == 1 else ref[hh, :]

    def kv(self, ref: Any, hh: int, rows: Any) -> jax.Array:  # k, v: [keys, D]
        return ref[rows, hh // self.groups, :] if self.block_h > self.groups else ref[rows, :]

    def store_q(self, ref: Any, hh: int, value: jax.Array) -> None:
        if self.block_h == 1:
            ref[...] = value
        else:
            ref[:, hh, :] = value

    def store_row(self, ref: Any, hh: int, value: jax.Array) -> None:
        if self.block_h == 1:
            ref[...] = value
        else:
            ref[hh, :] = value


def _head_specs(st: _Static, bq: int, tk: int, d: int, qb: Callable[[Any], Any]) -> tuple[Any, ...]:
    """BlockSpecs over the grid (query tiles, batch, head blocks): (q-like, kv, per-row [B, H, T])."""
    hb, g = st.tiles.block_h, st.groups
    if hb == 1:
        q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, qb(i), hi, 0))
        row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qb(i)))
    else:
        q_spec = pl.BlockSpec((None, bq, hb, d), lambda i, bi, hi: (bi, qb(i), hi, 0))
        row_spec = pl.BlockSpec((None, hb, bq), lambda i, bi, hi: (bi, hi, qb(i)))
    if hb > g:  # the block spans hb // g kv heads: kv block hi
        kv_spec = pl.BlockSpec((None, tk, hb // g, d), lambda i, bi, hi: (bi, 0, hi, 0))
    else:  # one kv head: the one of the block's first query head
        kv_spec = pl.BlockSpec((None, tk, None, d), lambda i, bi, hi: (bi, 0, lax.div(hi * hb, g), 0))
    return q_spec, kv_spec, row_spec


def _kv_tile_logits(
    q: jax.Array, hh: int, j: jax.Array, masked: bool, *, heads: _Heads, k_ref: Any, v_ref: Any,
    kv_ids_ref: Any, bk: int, scale: float, q_pos: jax.Array | None, q_ids: jax.Array | None,
    tail_len: int | None, walk: Callable[[Any], Any], allowed: Any,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Key tile walk(j) of query head hh, as the forward and dq kernels walk them: (k, v, base-2
    logits of q against k [rows, bk], the causal/segment validity or None); masked applies the
    masks (allowed: a static mask's predicate, or None)."""
    start = pl.multiple_of(walk(j) * bk, bk)
    k = heads.kv(k_ref, hh, pl.ds(start, bk))
    v = heads.kv(v_ref, hh, pl.ds(start, bk))
    s = _dot(q, k, trans_b=True) * scale
    valid = None
    if masked:
        s, valid = _mask_logits(
            s,
            q_pos=q_pos,
            kv_pos=start + jnp.arange(bk, dtype=jnp.int32),
            q_ids=q_ids,
            kv_ids=kv_ids_ref[pl.ds(start, bk)] if kv_ids_ref is not None else None,
            kv_len=tail_len,
            allowed=allowed,
        )
    return k, v, s, valid


def _query_tile(
    st: _Static, k_ref: Any, v_ref: Any, q_ids_ref: Any, kv_ids_ref: Any, bq: int, bk: int, n_q_blocks: int,
    sched_ref: Any = None,
) -> tuple[_Heads, Any, Any, Callable[..., tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]]]:
    """What a forward or dq program needs to walk the key tiles of its query tile: (heads, steps
    [0, full) without a mask, [full, end) with it, tile(q, hh, step, masked) -> _kv_tile_logits).
    A step is the key tile itself, or with a static mask an entry of its schedule row (`sched_ref`:
    masks.kv_schedule)."""
    qi = _q_block_index(st, n_q_blocks)(pl.program_id(0))
    segments = q_ids_ref is not None
    if st.mask is not None:
        full, end = sched_ref[0], sched_ref[1]
    else:
        full, end = _causal_kv_range(st, qi, bq, bk, segments)
    heads = _Heads(st.tiles.block_h, st.groups)
    tile = functools.partial(
        _kv_tile_logits, heads=heads, k_ref=k_ref, v_ref=v_ref, kv_ids_ref=kv_ids_ref, bk=bk,
        scale=st.sm_scale * _LOG2E,
        q_pos=qi * bq + st.offset + jnp.arange(bq, dtype=jnp.int32) if st.causal or st.mask else None,
        q_ids=q_ids_ref[...] if segments else None,
        tail_len=st.kv_len if st.kv_len % bk else None,
        walk=(lambda t: sched_ref[2 + t]) if st.mask is not None else (lambda j: j),
        allowed=st.mask.allowed if st.mask is not None else None,
    )
    return heads, full, end, tile


# --------------------------------------------------------------------------------------------
# pallas_call wrapper.


def _pallas(
    kernel: Callable[..., None],
    *,
    grid: tuple[int, ...],
    in_specs: list[pl.BlockSpec],
    out_specs: list[pl.BlockSpec],
    out_shape: list[jax.ShapeDtypeStruct],
    args: list[jax.Array],
    st: _Static,
    num_warps: int,
    num_stages: int,
    name: str,
) -> list[jax.Array]:
    """pallas_call; with st.poison the outputs alias NaN-filled inputs the kernel never reads."""
    n_in, n_out = len(args), len(out_shape)
    aliases: dict[int, int] = {}
    body = kernel
    if st.poison:
        args = [*args, *(jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape)]
        in_specs = [*in_specs, *out_specs]
        aliases = {n_in + i: i for i in range(n_out)}

        def body(*refs: Any) -> None:
            kernel(*refs[:n_in], *refs[n_in + n_out :])

    return pl.pallas_call(
        body,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=st.interpret,
        name=name,
    )(*args)
