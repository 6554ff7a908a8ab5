"""Kernels with one public function each; dispatch by backend and `impl=`."""

from vlm_jax.kernels.attention import attention
from vlm_jax.kernels.vq import vq_nearest

__all__ = ["attention", "vq_nearest"]
