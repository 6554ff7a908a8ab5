"""Nearest-codebook search in plain XLA: the reference every other implementation is checked against.

Semantics shared by all implementations (see `vlm_jax.kernels.vq`):

* Inputs are promoted to a common floating dtype; products are exact for bf16/f16 (accumulated in
  float32) and use full float32 precision (``Precision.HIGHEST``, no TF32) for float32 inputs.
* The index is ``argmin_k (||c_k||^2 - 2 x.c_k)``; the ``||x||^2`` term is constant per row, so it is
  only added to the reported distance. Ties go to the LOWEST index, exactly as ``jnp.argmin``.
* The distance is ``max(||x||^2 - 2 x.c + ||c||^2, 0)`` in float32, behind ``stop_gradient``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def compute_dtype(x: jax.Array, codebook: jax.Array) -> jnp.dtype:
    """The dtype both operands are cast to before the distance matmul (a floating dtype)."""
    dtype = jnp.result_type(x.dtype, codebook.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def dot_precision(dtype: jnp.dtype) -> lax.Precision | None:
    """Full float32 precision for float32 operands; bf16/f16 products are exact in float32 anyway."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else None


def check_inputs(x: jax.Array, codebook: jax.Array) -> None:
    """Raises ValueError unless x is [N, d] and codebook is [K, d] with K >= 1."""
    if x.ndim != 2 or codebook.ndim != 2:
        raise ValueError(f"vq_nearest wants x [N, d] and codebook [K, d]; got {x.shape} and {codebook.shape}")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(f"vq_nearest: feature sizes differ, x {x.shape} vs codebook {codebook.shape}")
    if codebook.shape[0] < 1:
        raise ValueError("vq_nearest: the codebook is empty")


def codebook_sq_norms(codebook: jax.Array) -> jax.Array:
    """||c_k||^2 in float32, [K]."""
    c = codebook.astype(jnp.float32)
    return jnp.sum(c * c, axis=-1)


def vq_nearest(x: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [N, d], codebook [K, d] -> (indices int32 [N], squared distances float32 [N]).

    Materialises the [N, K] score matrix; fine for small problems and on CPU, memory-hungry at scale.
    """
    check_inputs(x, codebook)
    dtype = compute_dtype(x, codebook)
    xc, cc = x.astype(dtype), codebook.astype(dtype)
    scores = lax.dot_general(
        xc,
        cc,
        (((1,), (1,)), ((), ())),
        precision=dot_precision(dtype),
        preferred_element_type=jnp.float32,
    )
    partial = codebook_sq_norms(cc)[None, :] - 2.0 * scores  # [N, K]; ||x||^2 is added after the min.
    indices = jnp.argmin(partial, axis=1).astype(jnp.int32)
    best = jnp.take_along_axis(partial, indices[:, None], axis=1)[:, 0]
    xf = xc.astype(jnp.float32)
    dist = jnp.maximum(jnp.sum(xf * xf, axis=1) + best, 0.0)
    return indices, lax.stop_gradient(dist)
