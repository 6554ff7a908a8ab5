"""Input embeddings: image patches, token ids, learned positions."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class PatchEmbedding(nn.Module):
    """Non-overlapping p x p patches -> width: [B, H, W, C] -> [B, (H/p)*(W/p), width].

    Params `kernel` [p, p, C, width] (the layout of a flax conv, so a torch Conv2d weight
    [width, C, p, p] maps by transpose(2, 3, 1, 0)) and optional `bias` [width].
    """

    width: int
    patch_size: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> tokens [B, N, width], row-major over the patch grid."""
        b, h, w, c = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image {h}x{w} is not divisible into {p}x{p} patches")
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                (None, None, "conv_in", "embed"),
            ),
            (p, p, c, self.width),
            jnp.float32,
        )
        # A stride-p conv is a matmul per patch; the einsum is exact and cheap on every backend.
        patches = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        x = jnp.einsum("bhpwqc,pqce->bhwe", patches, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (self.width,),
                jnp.float32,
            )
            x = x + bias.astype(self.dtype)
        return x.reshape(b, (h // p) * (w // p), self.width)


class PositionEmbedding(nn.Module):
    """Adds learned positions: x [B, T, E] + pos_embedding[:T] (param [length, E])."""

    length: int
    stddev: float = 0.02
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, E] with T <= length -> [B, T, E]."""
        t, e = x.shape[-2:]
        if t > self.length:
            raise ValueError(f"sequence of {t} is longer than the {self.length} learned positions")
        pos = self.param(
            "pos_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.stddev), ("length", "embed")),
            (self.length, e),
            jnp.float32,
        )
        return x.astype(self.dtype) + pos[:t].astype(self.dtype)


def token_embedding(
    vocab_size: int,
    width: int,
    *,
    dtype: Any = jnp.float32,
    stddev: float = 0.02,
    name: str | None = None,
) -> nn.Embed:
    """nn.Embed ids [B, T] -> [B, T, width]; its table is `embedding` [vocab, width] (decayed)."""
    return nn.Embed(
        vocab_size,
        width,
        dtype=dtype,
        param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev), ("vocab", "embed")
        ),
        name=name,
    )


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
    """Rotary inverse frequencies float32 [head_dim // 2]: theta ** (-2i / head_dim)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding, x [B, T, H, D], positions int [B, T] or [T] -> [B, T, H, D].

    The half-split ("rotate_half") layout of Hugging Face LLaMA: dims i and i + D/2 form a pair,
    so HF checkpoints (whose q/k projections are stored permuted for it) load unchanged. The
    rotation runs in float32 and the result is cast back to x's dtype.
    """
    d = x.shape[-1]
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None]
    freqs = positions.astype(jnp.float32)[..., None] * rope_frequencies(d, theta)  # [B, T, D/2]
    cos, sin = jnp.cos(freqs)[:, :, None], jnp.sin(freqs)[:, :, None]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
