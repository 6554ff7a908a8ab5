"""Fused nearest-codebook search for TPUs: a Pallas kernel lowered through Mosaic.

Grid (N blocks, K blocks), the K axis innermost and sequential ("arbitrary"). Step (i, j) multiplies the
codebook tile [block_k, d] by the resident x tile [block_n, d] (contracting d, float32 accumulation) into a
score tile laid out [block_k, block_n]: codes on sublanes, rows of x on lanes. Reducing over sublanes
gives lane-dense [1, block_n] rows, which is what the running (min, argmin) in VMEM scratch and the
[1, N] outputs want. The [N, K] matrix never reaches HBM.

Ties resolve to the LOWEST index, as `jnp.argmin`: inside a tile the index is the smallest code whose
value equals the tile minimum; across tiles the running best is replaced only when STRICTLY smaller.

Padding (outside the kernel): N to a multiple of `block_n`, d to a multiple of 128 (zeros), K to a
multiple of `block_k` with the padded codes' squared norms set to +inf. `||x||^2` is added to the
winning partial distance after the kernel (an XLA reduction that fuses with the read of x's norms).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vlm_jax.kernels.vq import reference

DEFAULT_BLOCK_N = 512
DEFAULT_BLOCK_K = 512
LANES = 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def compiler_params(dimension_semantics: tuple[str, ...]) -> Any:
    """Mosaic compiler params under whichever name this jax version uses."""
    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams", None)
    if cls is not None:
        return cls(dimension_semantics=dimension_semantics)
    return dict(mosaic=dict(dimension_semantics=dimension_semantics))


def default_config(n: int, k: int, *, block_n: int | None = None, block_k: int | None = None) -> dict[str, int]:
    """Block sizes (multiples of 128), clamped so small problems are not padded to a full default tile.

    With 512 x 512 tiles the float32 score tile is 1 MiB and the x / codebook tiles (double-buffered)
    another ~1 MiB at d=256 bf16: well inside the default scoped VMEM of every TPU generation.
    """
    if block_n is None:
        block_n = min(DEFAULT_BLOCK_N, _round_up(n, LANES))
    if block_k is None:
        block_k = min(DEFAULT_BLOCK_K, _round_up(k, LANES))
    for name, value in (("block_n", block_n), ("block_k", block_k)):
        if value < LANES or value % LANES:
            raise ValueError(f"pallas_tpu vq_nearest: {name}={value} must be a positive multiple of {LANES}")
    return dict(block_n=block_n, block_k=block_k)


def _kernel(
    x_ref: Any,
    c_ref: Any,
    cc_ref: Any,
    idx_ref: Any,
    part_ref: Any,
    best_d_ref: Any,
    best_i_ref: Any,
    *,
    block_k: int,
    precision: Any,
) -> None:
    """Grid step (i, j): codebook tile j against x tile i; running best in VMEM scratch."""
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init() -> None:
        best_d_ref[...] = jnp.full(best_d_ref.shape, jnp.inf, jnp.float32)
        best_i_ref[...] = jnp.zeros(best_i_ref.shape, jnp.int32)

    scores = lax.dot_general(
        c_ref[...], x_ref[...], (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )  # [block_k, block_n]
    partial = cc_ref[...] - 2.0 * scores  # cc [block_k, 1]: +inf on padded codes.
    tile_min = jnp.min(partial, axis=0, keepdims=True)  # [1, block_n]
    # First index attaining the minimum; block_k stands in for "none" and never survives the min. The
    # indices are carried as float32 (exact below 2**24) so the sublane reduction is a float min, the
    # best-supported kind in Mosaic.
    codes = lax.broadcasted_iota(jnp.int32, partial.shape, 0).astype(jnp.float32)
    tile_arg = jnp.min(jnp.where(partial == tile_min, codes, float(block_k)), axis=0, keepdims=True)
    tile_arg = tile_arg.astype(jnp.int32)
    better = tile_min < best_d_ref[...]  # Strict: equal values in later tiles keep the lower index.
    best_i_ref[...] = jnp.where(better, tile_arg + j * block_k, best_i_ref[...])
    best_d_ref[...] = jnp.where(better, tile_min, best_d_ref[...])

    @pl.when(j == pl.num_programs(1) - 1)
    def _write() -> None:
        idx_ref[...] = best_i_ref[...]
        part_ref[...] = best_d_ref[...]


def vq_nearest(
    x: jax.Array,
    codebook: jax.Array,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    interpret: Any = False,
) -> tuple[jax.Array, jax.Array]:
    """x [N, d], codebook [K, d] -> (indices int32 [N], squared distances float32 [N]); see module doc.

    `interpret` goes to `pl.pallas_call`: True for the generic interpreter, or a `pltpu.InterpretParams`
    for the TPU interpreter (uninitialised VMEM as NaN, out-of-bounds reads raise).
    """
    reference.check_inputs(x, codebook)
    n, d = x.shape
    k = codebook.shape[0]
    dtype = reference.compute_dtype(x, codebook)
    if n == 0:
        return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32)
    cfg = default_config(n, k, block_n=block_n, block_k=block_k)
    bn, bk = cfg["block_n"], cfg["block_k"]
    n_pad, k_pad, d_pad = _round_up(n, bn), _round_up(k, bk), _round_up(d, LANES)

    xp = x.astype(dtype)
    cp = codebook.astype(dtype)
    if (n_pad, d_pad) != (n, d):
        xp = jnp.pad(xp, ((0, n_pad - n), (0, d_pad - d)))
    if (k_pad, d_pad) != (k, d):
        cp = jnp.pad(cp, ((0, k_pad - k), (0, d_pad - d)))
    c_sq = reference.codebook_sq_norms(cp)
    if k_pad != k:
        c_sq = jnp.where(jnp.arange(k_pad) < k, c_sq, jnp.inf)

    kernel = functools.partial(_kernel, block_k=bk, precision=reference.dot_precision(dtype))
    idx, part = pl.pallas_call(
        kernel,
        grid=(n_pad // bn, k_pad // bk),
        in_specs=[
            pl.BlockSpec((bn, d_pad), lambda i, j: (i, 0)),
            pl.BlockSpec((bk, d_pad), lambda i, j: (j, 0)),
            pl.BlockSpec((bk, 1), lambda i, j: (j, 0)),
        ],
        out_specs=[pl.BlockSpec((1, bn), lambda i, j: (0, i)), pl.BlockSpec((1, bn), lambda i, j: (0, i))],
        out_shape=[jax.ShapeDtypeStruct((1, n_pad), jnp.int32), jax.ShapeDtypeStruct((1, n_pad), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((1, bn), jnp.float32), pltpu.VMEM((1, bn), jnp.int32)],
        compiler_params=compiler_params(("parallel", "arbitrary")),
        interpret=interpret,
        name="vq_nearest_tpu",
    )(xp, cp, c_sq[:, None])
    xf = x.astype(dtype).astype(jnp.float32)
    dist = jnp.maximum(jnp.sum(xf * xf, axis=1) + part[0, :n], 0.0)
    return idx[0, :n], lax.stop_gradient(dist)
