"""DALL-E (Ramesh et al. 2021): a decoder-only transformer over [text tokens; image tokens], the
image tokens coming from a frozen image tokenizer (vlm_jax.models.dvae, trained first).

The stream: text_len text positions, then grid * grid image positions in raster order
(seq_len = text_len + grid**2; the 12B model: 256 + 32 * 32 = 1280). One id space:

    [0, text_vocab)                       the run's text tokenizer ([bos] + pieces + [eos])
    [text_vocab, text_vocab + text_len)   a padding token per text position (the paper's: a pad
                                          at position p is id text_vocab + p, so the model knows
                                          where the caption ended)
    [image_offset, image_offset + K)      image codes, image_offset = text_vocab + text_len

Embeddings: a token table over that whole space, learned text positions, and a row plus a column
embedding for the image positions. Blocks are pre-LayerNorm (attention, then a GELU MLP of
mlp_ratio * width), each with a static DALL-E mask (kernels.attention.DalleMask): by default the
paper's pattern, row attention in every layer except column attention in the layers l (counted
from 1) with (l - 2) % 4 == 0 and convolutional attention in the last (`layer_masks`); "causal"
gives the dense causal mask everywhere. Output: logits over the whole id space; position p
predicts the token at p + 1, so positions 0 .. text_len - 2 predict the text (task: over the text
and pad ids) and text_len - 1 .. seq_len - 2 the image codes (over the image ids).

code_features (not in the paper; "none" for the 12B): the image codes also enter and leave through
the frozen tokenizer's own code vectors [K, e] (standardised over the codebook). "add": an image
position's input adds code_in(its code's vector) to its embedding row, and the image ids' logits
add code_out(x) . vectors; "only": the code vectors replace the image ids' embedding rows and
head columns (logits code_out(x) . vectors + code_bias). Codes that look alike then enter alike
and score alike: the aim is that a colour learned on the codes of some shapes carries to the codes
of a shape never seen in that colour (the world's held-out pairs; measured in the README).

text_condition "clip" (not in the paper; "none" for the 12B): the caption also enters through a
frozen CLIP text tower (its CLIP stage's, loaded by train.init_also): condition_in(its scaled
embedding, models.clip.frozen_text_embedding) is added to every position's input. The CLIP's
embedding space already composes colours and shapes it has seen apart (its zero-shot accuracy on
the world's held-out pairs is 0.97), which the stream's own text embeddings must learn from the
pairs the images show.

Params: tokenizer/... (the DVAE, frozen by the task's config), embed/embedding [V, E],
text_pos [text_len, E], row_pos / col_pos [grid, E], transformer/layers_i/{ln1, attn/{query, key, value
[E, H, D] + bias, out [H, D, E] + bias}, ln2, mlp/{fc1, fc2}}, final_norm, head/kernel [E, V]
(and with code_features code_in/kernel [e, E], code_out/kernel [E, e]; "only": code_bias [K]; with
text_condition "clip" clip_text/... and clip_projection/kernel (frozen), condition_in/kernel [E', E]).

Decoding (`make_decoder()`, for vlm_jax.sampling): a KV cache per layer with each slot's stream
position, masked by the same DalleMask predicate on positions; prompts are always text_len long
(the pads fill the rest), the image tokens are fed back as codes, and the decoder's logits are the
image codes' only (top-k / top-p then act over image tokens alone).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import kernels
from vlm_jax.kernels.attention.masks import KINDS as MASK_KINDS, DalleMask
from vlm_jax.layers.embeddings import token_embedding
from vlm_jax.layers.linear import DenseGeneral
from vlm_jax.layers.mlp import Mlp
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.transformer import REMAT_POLICIES
from vlm_jax.models import dvae
from vlm_jax.models import text as text_tower
from vlm_jax.models.clip import frozen_text_embedding

if TYPE_CHECKING:
    from vlm_jax.models.dalle_decoder import DalleDecoder

_ACT_AXES = ("batch", "length", "embed")


CODE_FEATURES = ("none", "add", "only")
TEXT_CONDITIONS = ("none", "clip")


def layer_masks(depth: int, pattern: str = "dalle") -> tuple[str, ...]:
    """The mask kind of each layer: "dalle" (row; column where (l - 2) % 4 == 0 for layers l
    counted from 1; conv in the last), one kind for every layer, or kinds joined by commas (one
    per layer)."""
    if pattern == "dalle":
        kinds = ["column" if (layer - 2) % 4 == 0 else "row" for layer in range(1, depth + 1)]
        if depth > 1:
            kinds[-1] = "conv"
        return tuple(kinds)
    kinds = [k.strip() for k in pattern.split(",")] if "," in pattern else [pattern] * depth
    unknown = sorted(set(kinds) - set(MASK_KINDS))
    if unknown:
        raise ValueError(f"unknown DALL-E mask kind(s) {unknown}; choose from {MASK_KINDS} (or 'dalle')")
    if len(kinds) != depth:
        raise ValueError(f"layer mask pattern names {len(kinds)} layers, the model has {depth}")
    return tuple(kinds)


def _cached_attention(mask: DalleMask, q, k, v, q_pos, k_pos) -> jax.Array:
    """q [B, T, H, D] at stream positions q_pos [B, T] over cached k/v [B, S, H, D] whose slots
    hold positions k_pos [B, S] (-1: empty) -> [B, T, H, D]; the mask's predicate on positions."""
    d = q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * d**-0.5
    ok = mask.allowed(q_pos[:, :, None], jnp.maximum(k_pos, 0)[:, None, :]) & (k_pos >= 0)[:, None, :]
    logits = jnp.where(ok[:, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _switch(kind: jax.Array | None, masks: tuple[DalleMask, ...], fn: Any, *args: Any) -> jax.Array:
    """fn(mask, *args) for masks[kind] (kind None: the only mask): a lax.switch over the static
    masks when the layer's kind is traced (scanned layers), so each branch keeps its own static
    mask (and the kernels their skipped tiles)."""
    if kind is None:
        return fn(masks[0], *args)
    return jax.lax.switch(kind, [functools.partial(fn, m) for m in masks], *args)


class Attention(nn.Module):
    """Self-attention under a static DALL-E mask: [B, T, E] -> [B, T, E]. `masks` holds one mask,
    or (scanned layers) each kind the stack uses, the call's `kind` picking one."""

    num_heads: int
    head_dim: int
    masks: tuple[DalleMask, ...]
    decode: bool = False
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array | None, kind: jax.Array | None = None) -> jax.Array:
        b, t, width = x.shape

        def project(name: str) -> jax.Array:
            y = DenseGeneral((self.num_heads, self.head_dim), (-1,), ("embed", "heads", "kv"),
                             dtype=self.dtype, name=name)(x)
            return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

        q, k, v = project("query"), project("key"), project("value")
        if not self.decode:
            attend = lambda mask, q, k, v: kernels.attention(q, k, v, static_mask=mask, impl=self.impl)  # noqa: E731
            y = _switch(kind, self.masks, attend, q, k, v)
        else:
            n, shape = self.masks[0].seq_len, (b, self.masks[0].seq_len, self.num_heads, self.head_dim)
            ck = self.variable("cache", "cached_key", jnp.zeros, shape, self.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, shape, self.dtype)
            cp = self.variable("cache", "cached_position", lambda: jnp.full((b, n), -1, jnp.int32))
            ci = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            if self.is_initializing():  # init(decode=True) creates the cache and writes nothing
                y = v
            else:
                zero, index = jnp.zeros((), jnp.int32), ci.value
                ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(self.dtype), (zero, index, zero, zero))
                cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(self.dtype), (zero, index, zero, zero))
                cp.value = jax.lax.dynamic_update_slice(cp.value, positions.astype(jnp.int32), (zero, index))
                ci.value = index + t
                y = _switch(kind, self.masks, _cached_attention, q, ck.value, cv.value, positions, cp.value)
        return DenseGeneral((width,), (-2, -1), ("heads", "kv", "embed"), dtype=self.dtype, name="out")(
            y.astype(self.dtype)
        )


class Block(nn.Module):
    """x + drop(attn(ln1(x))), then x + drop(mlp(ln2(x)))."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    masks: tuple[DalleMask, ...]
    decode: bool = False
    dtype: Any = jnp.float32
    impl: str = "auto"
    dropout: float = 0.0
    deterministic: bool = True
    # Under nn.scan the body maps (x, positions, kind) -> (x, None); kind is the scanned input.
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array | None, kind: jax.Array | None = None) -> Any:
        x = nn.with_logical_constraint(x, _ACT_AXES)
        y = LayerNorm(1e-5, self.dtype, name="ln1")(x)
        drop = nn.Dropout(self.dropout, deterministic=self.deterministic)
        x = x + drop(Attention(self.num_heads, self.head_dim, self.masks, self.decode, self.dtype, self.impl,
                               name="attn")(y, positions, kind))
        y = LayerNorm(1e-5, self.dtype, name="ln2")(x)
        x = x + drop(Mlp(self.mlp_dim, "gelu", self.dtype, name="mlp")(y))
        x = nn.with_logical_constraint(x, _ACT_AXES)
        return (x, None) if self.scanned else x


class Stack(nn.Module):
    """The blocks, one static mask each: [B, T, E] -> [B, T, E].

    Unrolled: params layers_0 .. layers_{depth-1}, each block compiled with its own mask. With
    scan_layers: one nn.scan over every layer (params `layers/...` with a leading [depth] axis, one
    compiled body), each layer's mask kind a scanned index that a lax.switch turns back into the
    static mask; remat inside a scan is what the compiler keeps (unrolled, XLA may schedule every
    recomputation early and keep all the activations anyway)."""

    masks: tuple[DalleMask, ...]
    num_heads: int
    head_dim: int
    mlp_dim: int
    dtype: Any = jnp.float32
    remat: str = "none"
    impl: str = "auto"
    scan_layers: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, decode: bool = False, train: bool = False) -> jax.Array:
        if self.remat != "none" and self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r}: choose none, {', '.join(REMAT_POLICIES)}")
        common = dict(num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim, decode=decode,
                      dtype=self.dtype, impl=self.impl, dropout=self.dropout, deterministic=not train)
        block = Block
        if self.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        if not self.scan_layers:
            for i, mask in enumerate(self.masks):
                x = block(masks=(mask,), **common, name=f"layers_{i}")(x, positions)
            return x
        distinct = tuple(dict.fromkeys(self.masks))
        kinds = jnp.asarray([distinct.index(m) for m in self.masks], jnp.int32)
        stack = nn.scan(
            block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, 0), length=len(self.masks), metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(masks=distinct, **common, scanned=True, name="layers")(x, positions, kinds)
        return x


class _KeptCondition(nn.Module):
    """The decoding cache's copy of the text condition [B, E]: stored by the prompt's call (value
    given), read back by the image tokens' calls (value None)."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, value: jax.Array | None, batch: int) -> jax.Array:
        kept = self.variable("cache", "condition", jnp.zeros, (batch, self.width), self.dtype)
        if value is not None and not self.is_initializing():
            kept.value = value
        return kept.value


class Dalle(nn.Module):
    """The DALL-E transformer with its (frozen) image tokenizer; see the module docstring."""

    text_vocab: int = 16384
    text_len: int = 256
    grid: int = 32
    width: int = 3968
    depth: int = 64
    heads: int = 62
    head_dim: int = 64
    mlp_ratio: float = 4.0
    mask_pattern: str = "dalle"
    conv_kernel: int = 11
    pad_id: int = 0
    tokenizer: Any = None  # a models.dvae.DVAE
    dtype: Any = jnp.float32
    remat: str = "none"
    scan_layers: bool = False  # one nn.scan over the layers (Stack)
    attn_impl: str = "auto"
    code_features: str = "none"  # "none" | "add" | "only" (the module docstring)
    text_condition: str = "none"  # "none" | "clip" (the module docstring)
    clip_text: Any = None  # text_condition "clip": a CLIP text tower (models.text), frozen
    clip_embed_dim: int = 0  # ... and its CLIP's embedding width
    dropout: float = 0.0  # on the input embeddings and each block's two residual branches, in training

    @property
    def num_codes(self) -> int:
        return int(self.tokenizer.num_codes)

    @property
    def image_offset(self) -> int:
        return self.text_vocab + self.text_len

    @property
    def vocab_size(self) -> int:
        return self.image_offset + self.num_codes

    @property
    def seq_len(self) -> int:
        return self.text_len + self.grid * self.grid

    def masks(self) -> tuple[DalleMask, ...]:
        return tuple(DalleMask(kind, self.text_len, self.grid, self.conv_kernel)
                     for kind in layer_masks(self.depth, self.mask_pattern))

    def setup(self):
        if self.tokenizer is None:
            raise ValueError("dalle: the model needs its image tokenizer (model.tokenizer, a dvae section)")
        self.embed = token_embedding(self.vocab_size, self.width, dtype=self.dtype, name="embed")
        init = nn.initializers.normal(0.02)
        self.text_pos = self.param("text_pos", nn.with_logical_partitioning(init, ("length", "embed")),
                                   (self.text_len, self.width), jnp.float32)
        self.row_pos = self.param("row_pos", nn.with_logical_partitioning(init, (None, "embed")),
                                  (self.grid, self.width), jnp.float32)
        self.col_pos = self.param("col_pos", nn.with_logical_partitioning(init, (None, "embed")),
                                  (self.grid, self.width), jnp.float32)
        self.transformer = Stack(
            self.masks(), self.heads, self.head_dim or self.width // self.heads,
            int(round(self.mlp_ratio * self.width)), self.dtype, self.remat, self.attn_impl, self.scan_layers,
            self.dropout, name="transformer",
        )
        self.input_dropout = nn.Dropout(self.dropout)
        self.final_norm = LayerNorm(1e-5, self.dtype, name="final_norm")
        self.head = DenseGeneral((self.vocab_size,), (-1,), ("embed", "vocab"), use_bias=False,
                                 dtype=self.dtype, name="head")
        if self.text_condition not in TEXT_CONDITIONS:
            raise ValueError(f"dalle: text_condition {self.text_condition!r}: choose one of {TEXT_CONDITIONS}")
        if self.text_condition == "clip":
            if self.clip_text is None or self.clip_embed_dim < 1:
                raise ValueError("dalle: text_condition 'clip' needs model.clip_text (a CLIP text tower's section) "
                                 "and model.clip_embed_dim")
            self.clip_projection = DenseGeneral((self.clip_embed_dim,), (-1,), ("embed", "mlp"), use_bias=False,
                                                dtype=jnp.float32, name="clip_projection")
            self.condition_in = DenseGeneral((self.width,), (-1,), (None, "embed"), use_bias=False,
                                             dtype=self.dtype, name="condition_in")
            self.kept_condition = _KeptCondition(self.width, self.dtype)
        if self.code_features not in CODE_FEATURES:
            raise ValueError(f"dalle: code_features {self.code_features!r}: choose one of {CODE_FEATURES}")
        if self.code_features == "only":
            self.code_bias = self.param("code_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                                        (self.num_codes,), jnp.float32)
        if self.code_features != "none":
            self.code_in = DenseGeneral((self.width,), (-1,), (None, "embed"), use_bias=False, dtype=self.dtype,
                                        name="code_in")
            self.code_out = DenseGeneral((self.tokenizer.embed_dim,), (-1,), ("embed", None), use_bias=False,
                                         dtype=self.dtype, name="code_out")

    # ------------------------------------------------------------------ the id stream

    def text_ids(self, tokens: jax.Array) -> jax.Array:
        """Text tokens int [B, L <= text_len] ([bos] + pieces + [eos] + pad_id) -> stream ids
        [B, text_len]: every pad (and the positions past L) the pad id of its position."""
        b, length = tokens.shape
        if length > self.text_len:
            raise ValueError(f"dalle: {length} text tokens do not fit text_len {self.text_len}")
        tokens = jnp.pad(tokens.astype(jnp.int32), ((0, 0), (0, self.text_len - length)),
                         constant_values=self.pad_id)
        pads = self.text_vocab + jnp.arange(self.text_len, dtype=jnp.int32)[None]
        return jnp.where(tokens == self.pad_id, pads, tokens)

    def image_ids(self, codes: jax.Array) -> jax.Array:
        """Codes int [B, grid**2] (raster order) -> stream ids."""
        return self.image_offset + codes.astype(jnp.int32)

    def encode_images(self, images: jax.Array) -> jax.Array:
        """images [B, S, S, 3] (data-normalised) -> codes int32 [B, grid**2], raster order."""
        if self.is_initializing():  # create every tokenizer variable (a VQ codebook, its statistics)
            self.tokenizer(images)
        codes = self.tokenizer.encode_codes(images)
        if codes.shape[1:] != (self.grid, self.grid):
            raise ValueError(f"dalle: the tokenizer gives a {codes.shape[1]}x{codes.shape[2]} grid for "
                             f"{images.shape[1]}x{images.shape[2]} images; the model's grid is {self.grid}")
        return codes.reshape(codes.shape[0], -1)

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """codes int [B, grid**2] -> images float32 [B, S, S, 3] (data normalisation)."""
        return self.tokenizer.decode_codes(codes.reshape(codes.shape[0], self.grid, self.grid))

    # ------------------------------------------------------------------ the transformer

    def _standard_code_vectors(self) -> jax.Array:
        """The frozen tokenizer's code vectors [K, e], standardised over the codebook (zero mean,
        unit variance per dimension), without gradient."""
        if self.is_initializing():
            side = self.grid * self.tokenizer.downsample
            self.tokenizer(jnp.zeros((1, side, side, 3), jnp.float32))
        vectors = jax.lax.stop_gradient(self.tokenizer.code_vectors())
        mean, std = jnp.mean(vectors, axis=0), jnp.std(vectors, axis=0)
        return (vectors - mean) / (std + 1e-6)

    def _positions_embedding(self, positions: jax.Array) -> jax.Array:
        """Stream positions int [B, T] -> their position embeddings [B, T, E]."""
        t = self.text_len
        positions = jnp.maximum(positions, 0)  # -1: a padding slot while decoding
        raster = jnp.maximum(positions - t, 0)
        image = jnp.take(self.row_pos, raster // self.grid, axis=0) + jnp.take(self.col_pos, raster % self.grid, axis=0)
        text = jnp.take(self.text_pos, jnp.minimum(positions, t - 1), axis=0)
        return jnp.where((positions < t)[..., None], text, image).astype(self.dtype)

    def _text_condition(self, ids: jax.Array, decode: bool) -> jax.Array:
        """condition_in(the frozen CLIP's embedding of the caption) [B, E], added to every position's
        input. The caption is read back from the stream's text part (pads -> pad_id: a dropped
        caption is the empty text); while decoding, the prompt's call computes it and the cache
        keeps it for the image tokens' calls."""
        b, t = ids.shape
        cond = None
        if not decode or t >= self.text_len:  # a whole stream, or the decoder's prompt
            text = ids[:, : self.text_len]
            tokens = jnp.where(text < self.text_vocab, text, self.pad_id)
            cond = self.condition_in(frozen_text_embedding(self.clip_text, self.clip_projection, tokens).astype(self.dtype))
        return self.kept_condition(cond, b) if decode else cond

    def logits(self, ids: jax.Array, positions: jax.Array | None = None, decode: bool = False,
               train: bool = False) -> jax.Array:
        """Stream ids int [B, T] at positions [B, T] (None: 0..T-1) -> logits f32 [B, T, vocab_size].
        Without decode T must be seq_len (the masks span the whole stream); with decode the caller
        passes each token's position (-1: padding, never attended)."""
        b, t = ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
        if not decode and t != self.seq_len:
            raise ValueError(f"dalle: a training stream is text_len + grid**2 = {self.seq_len} ids, got {t}")
        x = self.embed(ids)
        if self.code_features != "none":
            vectors = self._standard_code_vectors()
            is_code = (ids >= self.image_offset)[..., None]
            code = jnp.take(vectors, jnp.maximum(ids - self.image_offset, 0), axis=0)
            by_code = self.code_in(code.astype(self.dtype)).astype(x.dtype)
            x = jnp.where(is_code, by_code + (x if self.code_features == "add" else 0), x)
        if self.text_condition == "clip":
            x = x + self._text_condition(ids, decode)[:, None, :].astype(x.dtype)
        x = self.input_dropout(x + self._positions_embedding(positions), deterministic=not train)
        x = self.final_norm(self.transformer(x, positions, decode, train))
        logits = self.head(x)
        if self.code_features != "none":  # the image ids' logits read each code's vector
            shared = jnp.einsum("bte,ke->btk", self.code_out(x), vectors.astype(self.dtype)).astype(logits.dtype)
            if self.code_features == "add":
                logits = logits.at[..., self.image_offset:].add(shared)
            else:
                logits = logits.at[..., self.image_offset:].set(shared + self.code_bias)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab")).astype(jnp.float32)

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """images [B, S, S, 3], tokens [B, L] -> {"logits" f32 [B, seq_len, vocab_size], "codes"
        int32 [B, grid**2] (the tokenizer's, no gradient), "ids" int32 [B, seq_len] (the stream)}.
        `train` turns on model.dropout."""
        codes = jax.lax.stop_gradient(self.encode_images(images))
        ids = jnp.concatenate([self.text_ids(tokens), self.image_ids(codes)], axis=1)
        return {"logits": self.logits(ids, train=train), "codes": codes, "ids": ids}

    def make_decoder(self, guidance: float = 0.0, guidance_floor: float = 0.0) -> DalleDecoder:
        if guidance < 0 or not 0 <= guidance_floor < 1 or (guidance_floor > 0 and guidance == 0):
            raise ValueError(f"dalle: guidance {guidance} must be >= 0 and guidance_floor {guidance_floor} in "
                             "[0, 1), and a floor needs guidance > 0")
        from vlm_jax.models.dalle_decoder import DalleDecoder

        return DalleDecoder(self, float(guidance), float(guidance_floor))


def from_config(cfg: ml_collections.ConfigDict) -> Dalle:
    """Dalle from a model section: text_vocab, text_len, grid, width, depth, heads, head_dim,
    mlp_ratio, mask_pattern, conv_kernel, pad_id, dtype, remat, scan_layers, attn_impl, dropout, and `tokenizer`
    (a dvae model section)."""
    if "tokenizer" not in cfg:
        raise ValueError("dalle: model.tokenizer (the image tokenizer's model section) is missing")
    return Dalle(
        text_vocab=int(cfg.get("text_vocab", 16384)),
        text_len=int(cfg.get("text_len", 256)),
        grid=int(cfg.get("grid", 32)),
        width=int(cfg.get("width", 3968)),
        depth=int(cfg.get("depth", 64)),
        heads=int(cfg.get("heads", 62)),
        head_dim=int(cfg.get("head_dim", 64)),
        mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
        mask_pattern=str(cfg.get("mask_pattern", "dalle")),
        conv_kernel=int(cfg.get("conv_kernel", 11)),
        pad_id=int(cfg.get("pad_id", 0)),
        tokenizer=dvae.from_config(cfg.tokenizer),
        dtype=jnp.dtype(cfg.get("dtype", "float32")),
        remat=str(cfg.get("remat", "none")),
        scan_layers=bool(cfg.get("scan_layers", False)),
        attn_impl=str(cfg.get("attn_impl", "auto")),
        code_features=str(cfg.get("code_features", "none")),
        text_condition=str(cfg.get("text_condition", "none")),
        clip_text=text_tower.tower_from_config(cfg.clip_text) if cfg.get("clip_text") else None,
        clip_embed_dim=int(cfg.get("clip_embed_dim", 0)),
        dropout=float(cfg.get("dropout", 0.0)),
    )
