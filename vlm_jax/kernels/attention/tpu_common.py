"""Building blocks of the Pallas TPU (Mosaic) flash-attention kernels of `pallas_tpu.py`.

The static configuration of a call (`_Config`), layout helpers (heads of a block, lane / sublane
broadcasts), the causal block tests, the tile mask and the per-tile dispatch (`_run_blocks`: skip,
masked or mask-free step, from the causal bounds or a static mask's SMEM block map), the
scalar-prefetch pallas_call wrapper and the forward / dq BlockSpecs. Conventions: `pallas_tpu`'s
docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vlm_jax.kernels.attention import masks

NUM_LANES = 128
NUM_SUBLANES = 8
# Block-size candidates for the default choice, largest first; 512 suits v4/v5 at head_dim <= 256.
_DEFAULT_BLOCKS = (512, 384, 256, 128)
# Heads per program for short sequences (the default block_h / block_hkv), largest first, and the
# VMEM such a program may use (double-buffered blocks + scratch, `_vmem_bytes`): well under the
# default scoped VMEM limit (16 MiB on v4/v5e, 32 MiB on v6e), leaving room for the score temporaries.
_HEAD_BLOCKS = (8, 6, 4, 3, 2, 1)
_HEAD_BLOCK_VMEM_BUDGET = 8 * 2**20
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b

Interpret = Any  # bool or pltpu.InterpretParams

# --------------------------------------------------------------------------------------------
# Shapes and configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static parameters of one attention call (hashable: a nondiff argument of custom_vjp)."""

    causal: bool
    sm_scale: float
    block_q: int
    block_k: int
    q_len: int  # unpadded lengths: the causal offset and the kv padding mask need them
    kv_len: int
    groups: int  # query heads per kv head
    interpret: Interpret
    block_h: int = 1  # query heads per forward / dq program
    block_hkv: int = 1  # kv heads per dk/dv program
    mask: masks.DalleMask | None = None  # static mask: causal is False, the mask holds causality

    @property
    def kv_heads_per_block(self) -> int:
        """kv heads in a forward / dq program's k/v block (1 when its query heads share one)."""
        return max(self.block_h // self.groups, 1)

    @property
    def offset(self) -> int:
        """Position of query row 0 in the kv sequence (queries are the last q_len positions)."""
        return self.kv_len - self.q_len


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _padded_head_dim(d: int) -> int:
    """Head dim the kernels run at: multiples of 128 fill the MXU, 64 is handled natively too."""
    return d if d % NUM_LANES == 0 or d == 64 else _round_up(d, NUM_LANES)


def _head(ref: Any, index: int, count: int) -> Any:
    """Head `index` of a ref whose block holds `count` heads on its leading axis. With one head the
    BlockSpec (or the scratch shape) has no head axis and the ref is that head already."""
    return ref if count == 1 else ref.at[index]


def _lanes(x: jax.Array, n: int) -> jax.Array:
    """[rows, 128] with equal lanes -> [rows, n] (or [rows, 1] to broadcast when n is unusual)."""
    if n % NUM_LANES == 0:
        return x if n == NUM_LANES else jnp.tile(x, (1, n // NUM_LANES))
    if n < NUM_LANES:
        return x[:, :n]
    return x[:, :1]  # Interpret mode only: TPU blocks are multiples of 128.


def _dot(a: jax.Array, b: jax.Array, dims: Any) -> jax.Array:
    """MXU matmul with fp32 accumulation (and fp32 passes for fp32 operands)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _compiler_params(semantics: tuple[str, ...]) -> Any:
    return pltpu.CompilerParams(dimension_semantics=semantics)


# Causal block tests. Rows (queries) of q block i sit at kv positions [i*bq + off, (i+1)*bq + off);
# kv block j holds positions [j*bk, (j+1)*bk). With off >= 0 every q row sees key 0.


def _block_visible(i: Any, j: Any, cfg: _Config) -> Any:
    """Some key of kv block j is visible to some query of q block i."""
    return j * cfg.block_k <= (i + 1) * cfg.block_q - 1 + cfg.offset


def _block_fully_visible(i: Any, j: Any, cfg: _Config) -> Any:
    """Every key of kv block j is visible to every query of q block i (no causal mask needed)."""
    return (j + 1) * cfg.block_k - 1 <= i * cfg.block_q + cfg.offset


def _last_visible_kv_block(i: Any, cfg: _Config, num_kv_blocks: int) -> Any:
    last = lax.div((i + 1) * cfg.block_q - 1 + cfg.offset, cfg.block_k)
    return jnp.minimum(last, num_kv_blocks - 1)


def _first_visible_q_block(j: Any, cfg: _Config, num_q_blocks: int) -> Any:
    first = lax.div(jnp.maximum(j * cfg.block_k - cfg.offset, 0), cfg.block_q)
    return jnp.minimum(first, num_q_blocks - 1)


def _mask(
    rows: tuple[Any, int],
    cols: tuple[Any, int],
    q_axis: int,
    seg_rows: jax.Array | None,
    seg_cols: jax.Array | None,
    cfg: _Config,
    kv_bound: bool,
) -> jax.Array | None:
    """Boolean [rows, cols] visibility of a score tile.

    `rows`/`cols` are (first position, count) of the tile's axes; `q_axis` says which axis holds
    queries (0 in the forward and dq kernels, 1 in the transposed dk/dv kernel). `seg_rows` is a
    [rows, *] segment-id column and `seg_cols` a [1, cols] row (or None).
    """
    shape = (rows[1], cols[1])
    q_pos = lax.broadcasted_iota(jnp.int32, shape, q_axis) + (rows, cols)[q_axis][0]
    kv_pos = lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis) + (rows, cols)[1 - q_axis][0]
    mask = None

    def conj(a: jax.Array | None, b: jax.Array) -> jax.Array:
        return b if a is None else jnp.logical_and(a, b)

    if cfg.causal:
        mask = conj(mask, kv_pos <= q_pos + cfg.offset)
    if cfg.mask is not None:
        mask = conj(mask, cfg.mask.allowed(q_pos + cfg.offset, kv_pos))
    if kv_bound:
        mask = conj(mask, kv_pos < cfg.kv_len)
    if seg_rows is not None:
        mask = conj(mask, _lanes(seg_rows, cols[1]) == seg_cols)
    return mask


def _query_tile_mask(
    i: Any, j: Any, qs_ref: Any, ks_ref: Any, cfg: _Config, kv_bound: bool
) -> jax.Array | None:
    """`_mask` of the forward / dq tile (q block i, kv block j), [block_q, block_k]; qs_ref / ks_ref
    are the segment-id tiles (or None)."""
    return _mask(
        (i * cfg.block_q, cfg.block_q),
        (j * cfg.block_k, cfg.block_k),
        0,
        None if qs_ref is None else qs_ref[...],
        None if ks_ref is None else ks_ref[:1, :],
        cfg,
        kv_bound,
    )


def _run_blocks(
    i: Any, j: Any, cfg: _Config, segments: bool, kv_bound: bool, is_last_kv: Any, step: Any,
    tables: tuple[Any, ...] = (),
) -> None:
    """Run `step(masked)` for tile (q block i, kv block j): skip invisible causal tiles and use the
    mask-free body where no mask can apply. With a static mask, `tables` holds its block map
    (SMEM, `masks.tpu_tables`): EMPTY tiles are skipped, FULL ones unmasked (unless segments)."""
    if cfg.mask is not None:
        nk = _round_up(cfg.kv_len, cfg.block_k) // cfg.block_k
        kind = tables[0][i * nk + j]
        full = jnp.logical_and(kind == masks.FULL, not segments)
        pl.when(full)(lambda: step(False))
        pl.when(jnp.logical_and(kind != masks.EMPTY, jnp.logical_not(full)))(lambda: step(True))
        return
    if not (cfg.causal or segments or kv_bound):
        step(False)
        return
    visible = _block_visible(i, j, cfg) if cfg.causal else True
    if segments:
        pl.when(visible)(lambda: step(True))
        return
    needs_mask = False
    if cfg.causal:
        needs_mask = jnp.logical_not(_block_fully_visible(i, j, cfg))
    if kv_bound:
        needs_mask = jnp.logical_or(needs_mask, is_last_kv)
    pl.when(jnp.logical_and(visible, needs_mask))(lambda: step(True))
    pl.when(jnp.logical_and(visible, jnp.logical_not(needs_mask)))(lambda: step(False))


def _mask_tables(cfg: _Config, nq: int, nk: int) -> tuple[float, tuple[jax.Array, ...]]:
    """(fraction of tiles visited, for the cost estimates; a static mask's SMEM tables (block map,
    forward / dq kv fetch, dk/dv q fetch: `masks.tpu_tables`), () without one)."""
    if cfg.mask is None:
        return (0.5 if cfg.causal else 1.0), ()
    bmap = cfg.mask.block_map(cfg.block_q, cfg.block_k, cfg.q_len, cfg.kv_len, q_tiles=nq, k_tiles=nk)
    return float((bmap != masks.EMPTY).mean()), tuple(jnp.asarray(t) for t in masks.tpu_tables(bmap))


def _split_tables(refs: tuple[Any, ...], cfg: _Config) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(scalar-prefetch refs, the other refs): with a static mask a kernel's first two refs are
    its SMEM tables (block map, fetch table)."""
    return (refs[:2], refs[2:]) if cfg.mask is not None else ((), refs)


def _pallas_call(
    cfg: _Config, tables: tuple[jax.Array, ...], kernel: Callable[..., None], *, grid: tuple[int, ...],
    in_specs: Any, out_specs: Any, scratch_shapes: Any, **kwargs: Any,
) -> Callable[..., Any]:
    """pl.pallas_call; with a static mask `tables` are scalar-prefetch operands (SMEM), passed to the
    index maps after the grid indices and to the kernel before its refs."""
    if cfg.mask is None:
        return pl.pallas_call(
            kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch_shapes, **kwargs
        )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(tables), grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch_shapes,
    )
    call = pl.pallas_call(kernel, grid_spec=grid_spec, **kwargs)
    return lambda *args: call(*tables, *args)


def _lanes_ids(seg: jax.Array) -> jax.Array:
    """[B, T] -> [B, T, 128]: segment ids as a column tile (equal along lanes)."""
    return jnp.broadcast_to(seg[:, :, None], (*seg.shape, NUM_LANES))


def _sublanes_ids(seg: jax.Array) -> jax.Array:
    """[B, T] -> [B, 8, T]: segment ids as a row tile (equal along sublanes)."""
    return jnp.broadcast_to(seg[:, None, :], (seg.shape[0], NUM_SUBLANES, seg.shape[1]))


def _kv_block_map(cfg: _Config, nk: int) -> Callable[..., Any]:
    """(q block i, kv block j, *SMEM tables) -> the kv block the forward / dq grid loads at step
    (i, j): j, except for skipped tiles, which re-use the last block loaded (no new DMA): the last
    visible causal block, or a static mask's fetch table (`masks.tpu_tables`)."""

    def kv_block(i: Any, j: Any, *tables: Any) -> Any:
        if cfg.mask is not None:
            return tables[1][i * nk + j]
        return jnp.minimum(j, _last_visible_kv_block(i, cfg, nk)) if cfg.causal else j

    return kv_block


def _segment_inputs(
    cfg: _Config, kv_block: Callable[..., Any], q_seg: jax.Array | None, kv_seg: jax.Array | None
) -> tuple[list[Any], list[jax.Array]]:
    """(BlockSpecs, arrays) of the segment ids on the forward / dq grid: a [block_q, 128] column
    tile of the query ids and an [8, block_k] row tile of the key ids; ([], []) without ids."""
    if q_seg is None:
        return [], []
    specs = [
        pl.BlockSpec((None, cfg.block_q, NUM_LANES), lambda b_, h_, i, j, *_: (b_, i, 0)),
        pl.BlockSpec((None, NUM_SUBLANES, cfg.block_k), lambda b_, h_, i, j, *_: (b_, 0, kv_block(i, j, *_))),
    ]
    return specs, [_lanes_ids(q_seg), _sublanes_ids(kv_seg)]


def _head_specs(cfg: _Config, dp: int, kv_block: Any) -> tuple[Any, Any, Any]:
    """BlockSpecs of the forward and dq grids (B, H / block_h, q blocks, kv blocks): q-like
    [B, H, Tqp, dp] arrays, k/v [B, Hkv, Tkp, dp], and [B, H, 1, Tqp] per-row arrays.

    With block_h == 1 the head axis is squeezed; otherwise q-like blocks hold block_h heads and
    k/v blocks either the one kv head that the block's heads share (block_h <= groups) or
    block_h // groups kv heads (block_h > groups).
    """
    bq, bk, nh, g = cfg.block_q, cfg.block_k, cfg.block_h, cfg.groups
    heads = None if nh == 1 else nh
    q_spec = pl.BlockSpec((None, heads, bq, dp), lambda b_, h_, i, j, *_: (b_, h_, i, 0))
    row_spec = pl.BlockSpec((None, heads, 1, bq), lambda b_, h_, i, j, *_: (b_, h_, 0, i))
    if nh > g:  # kv head block h_ holds the kv heads of query head block h_
        kv_spec = pl.BlockSpec(
            (None, nh // g, bk, dp), lambda b_, h_, i, j, *_: (b_, h_, kv_block(i, j, *_), 0)
        )
    else:  # the kv head of the block's first query head
        kv_spec = pl.BlockSpec(
            (None, None, bk, dp), lambda b_, h_, i, j, *_: (b_, lax.div(h_ * nh, g), kv_block(i, j, *_), 0)
        )
    return q_spec, kv_spec, row_spec
