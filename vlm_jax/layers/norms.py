"""Norms computed in float32 whatever the compute dtype, with logically named params: LayerNorm,
RMSNorm, and GroupNorm (of conv feature maps: the diffusion UNet and its autoencoder)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def standardize(x: jax.Array, epsilon: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the last axis (biased variance, as torch's LayerNorm).

    Its gradient is written out, r * (g - mean(g) - y * mean(g * y)), rather than left to
    autodiff: XLA's CPU backend turned the derived graph into loops that cost several times
    the matmuls around them (a transformer block's backward pass ran 1.7x slower).
    """
    return _standardize_fwd(x, epsilon)[0]


def _standardize_fwd(x: jax.Array, epsilon: float) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + epsilon)
    y = centred * rstd
    return y, (y, rstd)


def _standardize_bwd(epsilon: float, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    del epsilon
    y, rstd = res
    mean_g = jnp.mean(g, axis=-1, keepdims=True)
    mean_gy = jnp.mean(g * y, axis=-1, keepdims=True)
    return (rstd * (g - mean_g - y * mean_gy),)


standardize.defvjp(_standardize_fwd, _standardize_bwd)


class LayerNorm(nn.Module):
    """Normalises the last axis: [..., C] -> [..., C] in `dtype`; params `scale`, `bias` [C]."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    axis_name: str = "embed"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., C] -> [..., C]; statistics in float32 so bf16 inputs do not lose precision."""
        features = x.shape[-1]
        names = (self.axis_name,)
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, names),
            (features,),
            jnp.float32,
        )
        # Biased variance, as torch.nn.LayerNorm, so imported weights reproduce exactly.
        y = standardize(x.astype(jnp.float32), float(self.epsilon)) * scale
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, names),
                (features,),
                jnp.float32,
            )
            y = y + bias
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm of the last axis (LLaMA, T5): [..., C] -> [..., C] in `dtype`.

    y = x / sqrt(mean(x^2) + eps) * scale, statistics in float32; param `scale` [C] (init ones).
    """

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., C] -> [..., C]; float32 statistics so bf16 inputs do not lose precision."""
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            jnp.float32,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * scale).astype(self.dtype)


class GroupNorm(nn.Module):
    """Group normalisation of [B, ..., C] (Wu & He 2018, as torch.nn.GroupNorm): statistics per
    example and group of C // groups channels over all positions, in float32 (two-pass biased
    variance); params `scale`, `bias` [C] named ("conv_out",); output in `dtype`."""

    groups: int
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, ..., C] -> [B, ..., C]; ValueError when `groups` does not divide C."""
        c = x.shape[-1]
        if c % self.groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by {self.groups} groups")
        g = x.astype(jnp.float32).reshape(x.shape[:-1] + (self.groups, c // self.groups))
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)  # all positions and the channels of a group
        centred = g - jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
        y = (centred * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        boxed = lambda init: nn.with_logical_partitioning(init, ("conv_out",))  # noqa: E731
        scale = self.param("scale", boxed(nn.initializers.ones), (c,), jnp.float32)
        bias = self.param("bias", boxed(nn.initializers.zeros), (c,), jnp.float32)
        return (y * scale + bias).astype(self.dtype)
