"""Input embeddings: image patches, token ids, learned positions."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.parallel.rules import fit_spec, spec_axes


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


def _lookup_plan(table_shape: tuple[int, int], ids_shape: tuple[int, ...]) -> dict[str, Any] | None:
    """How to look ids up in a split table under the current mesh and logical rules; None where
    jnp.take is already local (no mesh, or a table split over neither axis) or the layout is one
    this does not handle (sequence-split ids, an axis splitting two of table rows, columns, batch).

    vocab: the axes splitting the table's rows; embed: its columns; batch: the ids' rows; gather:
    the embed axes that also split the batch. mode "ids": gather the ids over `gather`, look up
    the local block of the table, sum over vocab, all-to-all back (`_lookup_with_gathered_ids`; the
    table never moves). mode "table": gather the table's columns (as FSDP does for any weight) and
    look up locally, summing over vocab. "ids" moves the activations (about tokens x features per
    device), "table" the table (its rows per vocab shard x features): the smaller one is chosen.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or len(ids_shape) != 2:
        return None
    table_spec = fit_spec(nn.logical_to_mesh_axes(("vocab", "embed")), table_shape, mesh)
    ids_spec = fit_spec(nn.logical_to_mesh_axes(("batch", "length")), ids_shape, mesh)

    def split(entry_index: int, spec: Any) -> tuple[str, ...]:  # the axes that really split (size > 1)
        entry = spec[entry_index] if entry_index < len(spec) else None
        return tuple(a for a in spec_axes(entry) if mesh.shape[a] > 1)

    def size(axes: tuple[str, ...]) -> int:
        return math.prod(mesh.shape[a] for a in axes)

    vocab, embed, batch = split(0, table_spec), split(1, table_spec), split(0, ids_spec)
    if not (vocab or embed) or split(1, ids_spec) or set(vocab) & (set(embed) | set(batch)):
        return None
    gather = tuple(a for a in embed if a in batch)
    tokens_here = ids_shape[0] * ids_shape[1] // size(batch)
    rows_here = table_shape[0] // size(vocab)
    mode = "ids" if gather == embed and tokens_here <= rows_here else "table"
    return dict(mode=mode, vocab=vocab, embed=embed, batch=batch, gather=gather)


def _lookup_with_gathered_ids(table: jax.Array, ids: jax.Array, plan: dict[str, Any]) -> jax.Array:
    """table [V, E] split (vocab, embed), ids [B, L] split (batch, -) -> [B, L, E] split (batch, -, -).

    Per device: gather the ids of the devices that share its batch rows' embed columns (tiny:
    ints), look up those ids that fall in its own vocab rows (zeros elsewhere), sum over the vocab
    shards, and send each device back its own rows with all their columns (an all-to-all of
    activation size). The table never moves, and its gradient stays split the same way.
    """
    vocab, embed, batch, gather = plan["vocab"], plan["embed"], plan["batch"], plan["gather"]
    spec = jax.sharding.PartitionSpec

    def body(table_shard: jax.Array, ids_shard: jax.Array) -> jax.Array:
        if gather:
            ids_shard = jax.lax.all_gather(ids_shard, gather, axis=0, tiled=True)
        if vocab:
            rows_here = table_shard.shape[0]
            local = ids_shard - jax.lax.axis_index(vocab) * rows_here
            inside = (local >= 0) & (local < rows_here)
            out = jnp.take(table_shard, jnp.where(inside, local, 0), axis=0) * inside[..., None]
            out = jax.lax.psum(out, vocab)
        else:
            out = jnp.take(table_shard, ids_shard, axis=0)
        if gather:
            out = jax.lax.all_to_all(out, gather, split_axis=0, concat_axis=2, tiled=True)
        return out

    return jax.shard_map(
        body,
        in_specs=(spec(vocab, embed), spec(batch, None)),
        out_specs=spec(batch, None, None),
    )(table, ids)


class TokenEmbedding(nn.Module):
    """Token ids [...] -> [..., features] in `dtype`; `attend(x)` = x @ table.T (tied output heads).

    Param `embedding` [vocab, features] (float32, logical axes ("vocab", "embed"); the name and
    layout of nn.Embed, so checkpoints and converted weights are the same).

    Under a mesh that splits the table (fsdp over its features, tensor over vocab) the lookup is
    explicit (`_lookup_plan`): either the ids are gathered and the rows sent back with an
    all-to-all, the table never moving, or the table's columns are gathered, whichever moves fewer
    bytes. Left to XLA's partitioner, a gather from a table split over its features came out split
    over features, and on several meshes (TinyLlama on data=2 fsdp=2 tensor=2; CLIP ViT-B/16 on
    data=2 fsdp=4) XLA could only reshard that by replicating whole [batch, length, features]
    activations ("involuntary full rematerialization", which `vlm-jax plan` reports).

    Ids must lie in [0, vocab): others give NaN rows (jnp.take's fill), or zero rows in the
    vocab-split lookup.
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
        """ids int [...] -> [..., features]."""
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        table = self.embedding.astype(self.dtype)
        plan = _lookup_plan(table.shape, ids.shape)
        if plan is not None and plan["mode"] == "ids":
            out = _lookup_with_gathered_ids(table, ids, plan)
        else:
            if plan is not None:  # "table": columns gathered; XLA sums the vocab shards' rows
                table = nn.with_logical_constraint(table, ("vocab", None))
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
