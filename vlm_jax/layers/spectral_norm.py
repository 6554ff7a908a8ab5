"""Spectrally normalised convolution (Miyato et al. 2018): the kernel divided by its largest
singular value, estimated by one step of power iteration per training call.

flax's nn.SpectralNorm walks the wrapped layer's variables by dict keys and so cannot read params
boxed with logical axis names; this layer owns its kernel (logical axes kept) and its power-iteration
vector `u` (collection "batch_stats", so the trainer carries it like batch norm statistics).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_EPS = 1e-12


def _l2(x: jax.Array) -> jax.Array:
    return x / (jnp.linalg.norm(x) + _EPS)


def spectral_normalise(w: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """w [..., out] (viewed as a matrix [prod(...), out]), u [out] -> (w / sigma, new u, sigma),
    after one power-iteration step from u; u and sigma carry no gradient (as in the paper)."""
    mat = w.reshape(-1, w.shape[-1])
    v = _l2(mat @ jax.lax.stop_gradient(u))
    u_new = jax.lax.stop_gradient(_l2(mat.T @ v))
    sigma = jnp.dot(jax.lax.stop_gradient(v), mat @ u_new)
    return w / sigma, u_new, sigma


class SpectralConv(nn.Module):
    """nn.Conv [B, H, W, C] -> [B, H', W', features], its kernel spectrally normalised.

    train=True advances the power iteration (and stores u); otherwise the stored u is used as is.
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: Any = "SAME"
    use_bias: bool = True
    kernel_init: Any = nn.initializers.normal(0.02)
    axes: tuple[str | None, ...] = (None, None, "conv_in", "conv_out")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, self.axes), (k, k, x.shape[-1], self.features),
            jnp.float32,
        )
        u = self.variable(
            "batch_stats", "u", lambda: _l2(jnp.ones((self.features,), jnp.float32))
        )
        w, u_new, _ = spectral_normalise(kernel, u.value)
        if train and not self.is_initializing():
            u.value = u_new
        padding = self.padding if isinstance(self.padding, str) else tuple(tuple(p) for p in self.padding)
        y = jax.lax.conv_general_dilated(
            x.astype(jnp.float32), w, (self.strides, self.strides), padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.use_bias:
            y = y + self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[-1:]), (self.features,),
                jnp.float32,
            )
        return y
