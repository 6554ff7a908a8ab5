"""`vq_nearest(x, codebook)`: the nearest codebook row for each row of x, by squared Euclidean distance.

x [N, d], codebook [K, d] -> (indices int32 [N], squared distances float32 [N]).

Implementations (`impl=`):

* "xla": `reference.vq_nearest`, a matmul plus argmin; materialises the [N, K] matrix. Any backend.
* "pallas_gpu": fused Triton kernel (`pallas_gpu.py`); the [N, K] matrix never reaches HBM.
* "pallas_tpu": fused Mosaic kernel (`pallas_tpu.py`); likewise.
* "auto": the Pallas kernel of the default backend when N*K is large enough to matter
  (`AUTO_MIN_NK`) and d is not too wide for the kernel's tiles; "xla" otherwise (and always on CPU).

Forcing a Pallas implementation on a backend that cannot run it raises ValueError, unless
`interpret=True` (the kernel is then run by the Pallas interpreter, on any backend: for tests).

Semantics, identical for every implementation (up to float summation order):

* Both operands are cast to their common floating dtype; the distance matmul accumulates in float32
  (bf16/f16 products are exact; float32 operands use full precision, no TF32).
* The index minimises ``||c_k||^2 - 2 x.c_k``; ties go to the LOWEST index, exactly as `jnp.argmin`.
  Padded codes (kernels) are masked with +inf and can never win.
* The distance is ``max(||x||^2 - 2 x.c + ||c||^2, 0)``, float32.
* Nothing here is differentiable: indices are integers and the distances are returned behind
  `stop_gradient`. A loss that needs gradients should recompute ``||x - codebook[indices]||^2``
  (as `vlm_jax.layers.quantizer.VectorQuantizer` does).
* Under jit with sharded inputs, the Pallas kernels are not partitioned automatically: call them
  inside `shard_map` over the row axis (each shard with the full codebook), or use "xla".
"""

from __future__ import annotations

from typing import Any

import jax

from vlm_jax.kernels.vq import reference

IMPLEMENTATIONS = ("auto", "xla", "pallas_gpu", "pallas_tpu")
AUTO_MIN_NK = 1 << 22  # Below ~4M scores the XLA matmul is cheap and the launch overhead dominates.
AUTO_MAX_D = 1024  # Wider features: tiles would no longer fit on chip with the default block sizes.


def _backend() -> str:
    return jax.default_backend()


def _auto_impl(n: int, k: int, d: int) -> str:
    backend = _backend()
    if n * k < AUTO_MIN_NK or d > AUTO_MAX_D:
        return "xla"
    if backend in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    if backend == "tpu":
        return "pallas_tpu"
    return "xla"


def vq_nearest(
    x: jax.Array,
    codebook: jax.Array,
    *,
    impl: str = "auto",
    interpret: Any = False,
    block_n: int | None = None,
    block_k: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Nearest codebook entry per row: x [N, d], codebook [K, d] -> (indices int32 [N], sq. dists f32 [N]).

    Args:
      x: [N, d] float (bf16 / f16 / f32) vectors to quantise.
      codebook: [K, d] float codebook.
      impl: "auto", "xla", "pallas_gpu" or "pallas_tpu" (see the module docstring).
      interpret: run a Pallas implementation through the Pallas interpreter (any backend; slow). True,
        or for "pallas_tpu" also a `pltpu.InterpretParams` (the TPU-specific interpreter).
      block_n: rows of x per kernel program (Pallas only; None: the kernel's default for this shape).
      block_k: codebook rows per inner tile (Pallas only; None: the kernel's default).

    Returns:
      (indices, squared_distances); ties resolve to the lowest index; distances carry no gradient.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"vq_nearest impl {impl!r} is not available; choose one of {IMPLEMENTATIONS}")
    reference.check_inputs(x, codebook)
    if impl == "auto":
        impl = _auto_impl(x.shape[0], codebook.shape[0], x.shape[1])
    if impl == "xla":
        return reference.vq_nearest(x, codebook)
    backend = _backend()
    if impl == "pallas_gpu":
        if not interpret and backend not in ("gpu", "cuda", "rocm"):
            raise ValueError(
                f"vq_nearest impl 'pallas_gpu' needs a GPU backend (default backend is {backend!r}); "
                "use impl='xla', or interpret=True to run the kernel in the Pallas interpreter"
            )
        from vlm_jax.kernels.vq import pallas_gpu

        return pallas_gpu.vq_nearest(x, codebook, block_n=block_n, block_k=block_k, interpret=interpret)
    if not interpret and backend != "tpu":
        raise ValueError(
            f"vq_nearest impl 'pallas_tpu' needs a TPU backend (default backend is {backend!r}); "
            "use impl='xla', or interpret=True to run the kernel in the Pallas interpreter"
        )
    from vlm_jax.kernels.vq import pallas_tpu

    return pallas_tpu.vq_nearest(x, codebook, block_n=block_n, block_k=block_k, interpret=interpret)


__all__ = ["IMPLEMENTATIONS", "vq_nearest"]
