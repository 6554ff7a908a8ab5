"""Kernels with one public function each; dispatch by backend and `impl=`."""

from vlm_jax.kernels.attention import attention

__all__ = ["attention"]
