"""Fused nearest-codebook search for GPUs: a Pallas kernel lowered through Triton.

One program per `block_n` rows of x (the grid). Each program keeps its x tile on chip and loops over the
codebook in `block_k`-row tiles: a [block_n, block_k] score tile from one matmul (float32 accumulation),
a per-tile min/argmin, and a running (min, argmin) carried through the loop. The [N, K] distance matrix
never reaches HBM. A later tile replaces the running best only when STRICTLY smaller and `argmin`
inside a tile picks the first minimum, so ties resolve to the lowest index, as `jnp.argmin` does.

Padding (done here, outside the kernel): N to a multiple of `block_n` (zero rows, sliced off), d to a
power of two >= 16 (zeros: distances unchanged), K to a multiple of `block_k` with the padded codes'
squared norms set to +inf so they never win.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vlm_jax.kernels.vq import reference

# Defaults tuned (by arithmetic, see `default_config`) for an H100 at the benchmark shapes
# N=65536 d=256 K=8192 and N=262144 d=64 K=1024 with bf16 inputs.
DEFAULT_BLOCK_N = 128
SMEM_BUDGET_BYTES = 160 * 1024  # Leaves room under the 227 KiB an H100 SM offers.


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def compiler_params(num_warps: int, num_stages: int) -> Any:
    """Triton compiler params under whichever name this jax version uses."""
    try:
        from jax.experimental.pallas import triton as plgpu
    except ImportError:  # Older jax: the Triton params lived in pallas.gpu.
        from jax.experimental.pallas import gpu as plgpu  # type: ignore[no-redef]
    for name in ("CompilerParams", "TritonCompilerParams"):
        cls = getattr(plgpu, name, None)
        if cls is not None:
            return cls(num_warps=num_warps, num_stages=num_stages)
    cls = getattr(pl, "TritonCompilerParams", None)
    if cls is not None:
        return cls(num_warps=num_warps, num_stages=num_stages)
    return dict(triton=dict(num_warps=num_warps, num_stages=num_stages))


def default_config(
    n: int,
    k: int,
    d: int,
    dtype: Any,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> dict[str, int]:
    """Block sizes and launch params; anything given is kept, the rest chosen for an H100.

    Shared memory per program is about `block_n*d_pad*itemsize` (the resident x tile) plus
    `num_stages*block_k*d_pad*itemsize` (pipelined codebook tiles), kept under `SMEM_BUDGET_BYTES`.
    bf16, d=256 (K=8192): block_n=128, block_k=64, 3 stages, 8 warps (160 KiB);
    bf16, d=64 (K=1024): block_n=128, block_k=128, 3 stages, 8 warps. Chosen by arithmetic, not measured.
    """
    d_pad = max(16, _next_pow2(d))
    itemsize = jnp.dtype(dtype).itemsize
    fixed_n, fixed_k, fixed_stages = block_n is not None, block_k is not None, num_stages is not None
    if block_n is None:
        block_n = min(DEFAULT_BLOCK_N, max(16, _next_pow2(n)))
    if block_k is None:
        block_k = min(128, max(16, _next_pow2(k)))
    if num_stages is None:
        num_stages = 3

    def smem(bn: int, bk: int, stages: int) -> int:
        return (bn + stages * bk) * d_pad * itemsize

    # Shrink whatever was not given until the tiles fit: block_k to 64, stages to 2, block_k to 32,
    # block_n to 32, then a single stage.
    while smem(block_n, block_k, num_stages) > SMEM_BUDGET_BYTES:
        if not fixed_k and block_k > 64:
            block_k //= 2
        elif not fixed_stages and num_stages > 2:
            num_stages -= 1
        elif not fixed_k and block_k > 32:
            block_k //= 2
        elif not fixed_n and block_n > 32:
            block_n //= 2
        elif not fixed_stages and num_stages > 1:
            num_stages -= 1
        else:
            break  # Very wide features: let Triton try (or fail loudly).
    for name, value in (("block_n", block_n), ("block_k", block_k)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"pallas_gpu vq_nearest: {name}={value} must be a power of two >= 16 (Triton)")
    if num_warps is None:
        # The score tile and the resident x tile live in registers: spread big ones over 8 warps.
        num_warps = 8 if block_n * max(block_k, d_pad) >= 128 * 128 else 4
    return dict(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages, d_pad=d_pad)


def _kernel(
    x_ref: Any, c_ref: Any, cc_ref: Any, idx_ref: Any, dist_ref: Any, *, block_k: int, num_k_blocks: int, precision: Any
) -> None:
    """One block of rows: loop over codebook tiles, keep the running min / argmin in registers."""
    x = x_ref[...]  # [block_n, d_pad], resident for the whole loop.
    block_n = x.shape[0]
    xf = x.astype(jnp.float32)
    x_sq = jnp.sum(xf * xf, axis=1)

    def body(kb: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        best_d, best_i = carry
        start = pl.multiple_of(kb * block_k, block_k)
        c = c_ref[pl.ds(start, block_k), :]  # [block_k, d_pad]
        c_sq = cc_ref[pl.ds(start, block_k)]  # [block_k]; +inf on padded codes.
        scores = lax.dot_general(
            x, c, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        partial = c_sq[None, :] - 2.0 * scores  # [block_n, block_k]
        tile_min = jnp.min(partial, axis=1)
        tile_arg = lax.argmin(partial, 1, jnp.int32)  # First minimum inside the tile.
        better = tile_min < best_d  # Strict: an equal value in a later tile keeps the lower index.
        return jnp.where(better, tile_min, best_d), jnp.where(better, tile_arg + start, best_i)

    init = (jnp.full((block_n,), jnp.inf, jnp.float32), jnp.zeros((block_n,), jnp.int32))
    best_d, best_i = lax.fori_loop(0, num_k_blocks, body, init)
    idx_ref[...] = best_i
    dist_ref[...] = jnp.maximum(x_sq + best_d, 0.0)


def vq_nearest(
    x: jax.Array,
    codebook: jax.Array,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """x [N, d], codebook [K, d] -> (indices int32 [N], squared distances float32 [N]); see module doc."""
    reference.check_inputs(x, codebook)
    n, d = x.shape
    k = codebook.shape[0]
    dtype = reference.compute_dtype(x, codebook)
    if n == 0:
        return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32)
    cfg = default_config(
        n, k, d, dtype, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages
    )
    bn, bk, d_pad = cfg["block_n"], cfg["block_k"], cfg["d_pad"]
    n_pad, k_pad = _round_up(n, bn), _round_up(k, bk)

    xp = x.astype(dtype)
    cp = codebook.astype(dtype)
    if (n_pad, d_pad) != (n, d):
        xp = jnp.pad(xp, ((0, n_pad - n), (0, d_pad - d)))
    if (k_pad, d_pad) != (k, d):
        cp = jnp.pad(cp, ((0, k_pad - k), (0, d_pad - d)))
    c_sq = reference.codebook_sq_norms(cp)
    if k_pad != k:
        c_sq = jnp.where(jnp.arange(k_pad) < k, c_sq, jnp.inf)

    kernel = functools.partial(
        _kernel, block_k=bk, num_k_blocks=k_pad // bk, precision=reference.dot_precision(dtype)
    )
    idx, dist = pl.pallas_call(
        kernel,
        grid=(n_pad // bn,),
        in_specs=[
            pl.BlockSpec((bn, d_pad), lambda i: (i, 0)),
            pl.BlockSpec((k_pad, d_pad), lambda i: (0, 0)),  # Whole codebook; tiles are loaded in the loop.
            pl.BlockSpec((k_pad,), lambda i: (0,)),
        ],
        out_specs=[pl.BlockSpec((bn,), lambda i: (i,)), pl.BlockSpec((bn,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((n_pad,), jnp.int32), jax.ShapeDtypeStruct((n_pad,), jnp.float32)],
        compiler_params=compiler_params(cfg["num_warps"], cfg["num_stages"]),
        interpret=interpret,
        name="vq_nearest_gpu",
    )(xp, cp, c_sq)
    return idx[:n], lax.stop_gradient(dist[:n])
