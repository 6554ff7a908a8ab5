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


class TokenEmbedding(nn.Module):
    """Token ids [...] -> [..., features] in `dtype`; `attend(x)` = x @ table.T (tied output heads).

    Param `embedding` [vocab, features] (float32, logical axes ("vocab", "embed"); the name and
    layout of nn.Embed, so checkpoints and converted weights are the same). The lookup first
    gathers the table's feature axis (as FSDP gathers any weight before use) but keeps it split
    over vocab, so each "vocab" shard looks up the ids in its own rows and the shards' partial rows
    are summed (a vocab-parallel embedding, the gradient stays split the same way); the output is
    sharded like any activation ("batch", "length", "embed"). Left to itself, XLA's partitioner
    looked rows up in the table still split over vocab and features, got an output split over
    features, and could only reach the batch sharding by replicating the whole [batch, length,
    features] activation ("involuntary full rematerialization") every step.
    """

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    stddev: float = 0.02

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.stddev), ("vocab", "embed")),
            (self.num_embeddings, self.features),
            jnp.float32,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids int [...] -> [..., features]; ids outside [0, vocab) give NaN rows (jnp.take's fill)."""
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        table = nn.with_logical_constraint(self.embedding.astype(self.dtype), ("vocab", None))  # see above
        out = jnp.take(table, ids, axis=0)
        if out.ndim == 3:
            out = nn.with_logical_constraint(out, ("batch", "length", "embed"))
        return out

    def attend(self, query: jax.Array) -> jax.Array:
        """query [..., features] -> logits [..., vocab] against the same table."""
        return jnp.dot(query.astype(self.dtype), self.embedding.astype(self.dtype).T)


def token_embedding(
    vocab_size: int,
    width: int,
    *,
    dtype: Any = jnp.float32,
    stddev: float = 0.02,
    name: str | None = None,
) -> TokenEmbedding:
    """ids [B, T] -> [B, T, width]; its table is `embedding` [vocab, width] (decayed)."""
    return TokenEmbedding(vocab_size, width, dtype=dtype, stddev=stddev, name=name)


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
