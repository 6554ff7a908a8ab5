"""Show and Tell (Vinyals et al. 2015): a CNN image embedding fed to an LSTM once, at t = -1,
then the caption's word embeddings; a softmax over the vocabulary at every step.

    x_{-1} = W_I CNN(I),   x_t = W_e S_t,   p_{t+1} = softmax(W_o LSTM(x_t))

Teacher forcing: `__call__(images [B,H,W,3], tokens [B,L])` -> logits f32 [B, L, V] where
logits[:, t] is the distribution of tokens[:, t + 1] given the image and tokens[:, :t + 1] (the
LSTM has read the image, then tokens 0..t). So the loss compares logits[:, :-1] with tokens[:, 1:]
(tasks/caption.py); the last position predicts what would follow tokens[:, -1].

image_input "every_step" (not the paper's; the par-inject captioners of Mao et al. 2015 and
Donahue et al. 2015) drops the t = -1 step and feeds [W_e S_t; x_img] at every step instead, so
logits[:, t] is still the distribution of tokens[:, t + 1]. image_norm "layer" | "batch" normalises
the image embedding (batch: BatchNorm, statistics in the "batch_stats" collection).

Image encoders (`encoder.kind`): "cnn" (resnet.SmallCNN, the tiny config), "vgg" (a VGG-style
conv stack, below), "resnet" (CLIP's ModifiedResNet; BatchNorm: its statistics live in the
"batch_stats" collection) or "vit". `encoder.freeze` stops the gradient at the encoder's output
(the encoder's params still get weight decay unless optim.trainable excludes them).

Decoding (vlm_jax.sampling.decode): `make_decoder()` -> ShowTellDecoder, whose "cache" is the
LSTM state (c, h) (and the image embedding with every_step); `context` is the images: init_cache
encodes them and runs the t = -1 step.

Param tree: encoder/..., image_proj (W_I), embed/embedding (W_e), lstm/cell/{input_kernel,
hidden_kernel, bias} (vlm_jax.layers.lstm: forget-gate bias 1 at init), out (W_o).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers.embeddings import token_embedding
from vlm_jax.layers.linear import dense
from vlm_jax.layers.lstm import LSTMCell
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.models import resnet, vit

ENCODERS = ("cnn", "vgg", "resnet", "vit")
IMAGE_NORMS = ("none", "layer", "batch")
IMAGE_INPUTS = ("once", "every_step")
# VGG-16's conv stages (convs per stage, channels); without the last pool: 224 -> 14x14x512.
VGG16 = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


class VGG(nn.Module):
    """VGG-style stack: per stage, n x (3x3 conv [-> LayerNorm] -> ReLU), then a 2x2 max pool
    (not after the last stage unless pool_last): images [B, H, W, C] -> grid [B, h, w, channels]."""

    stages: tuple[tuple[int, int], ...] = VGG16
    norm: str = "none"  # none | layer
    pool_last: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        del train
        if self.norm not in resnet.NORMS:
            raise ValueError(f"VGG norm {self.norm!r}: choose one of {resnet.NORMS}")
        x = images.astype(self.dtype)
        for i, (n, features) in enumerate(self.stages):
            for j in range(n):
                x = resnet._conv(features, 3, use_bias=self.norm == "none", dtype=self.dtype,
                                 name=f"conv{i}_{j}", matmul_wgrad=True)(x)
                if self.norm == "layer":
                    x = LayerNorm(1e-5, self.dtype, axis_name="conv_out", name=f"norm{i}_{j}")(x)
                x = nn.relu(x)
            if i < len(self.stages) - 1 or self.pool_last:
                x = resnet._max_pool_2x2(x)
        return x


def build_encoder(cfg: ml_collections.ConfigDict, dtype: str = "float32") -> tuple[nn.Module, str]:
    """(image tower, kind) from an `encoder` section: kind cnn | vgg | resnet | vit."""
    kind = cfg.get("kind", "cnn")
    if kind == "cnn":
        return resnet.from_config(cfg, kind="cnn", dtype=dtype), kind
    if kind == "resnet":
        return resnet.from_config(cfg, kind="resnet", dtype=dtype), kind
    if kind == "vgg":
        stages = tuple((int(n), int(c)) for n, c in cfg.get("stages", VGG16))
        return VGG(stages, cfg.get("norm", "none"), cfg.get("pool_last", False), jnp.dtype(dtype)), kind
    if kind == "vit":
        return vit.from_config(cfg, dtype=dtype), kind
    raise ValueError(f"image encoder kind {kind!r}: choose one of {ENCODERS}")


def encode_images(encoder: nn.Module, kind: str, images: jax.Array, train: bool) -> tuple[jax.Array, jax.Array | None]:
    """-> (image vector f32 [B, D], annotation grid f32 [B, L, D'] or None for pooled-only towers)."""
    if kind == "vgg":
        grid = encoder(images, train=train).astype(jnp.float32)
        grid = grid.reshape(grid.shape[0], -1, grid.shape[-1])
        return grid.mean(axis=1), grid
    if kind == "vit":
        out = encoder.encode(images, train=train)
        hidden = out["hidden"].astype(jnp.float32)
        grid = hidden[:, 1:] if encoder.class_token else hidden
        return out["pre_logits"].astype(jnp.float32), grid
    if kind == "cnn":  # the last stage before its pool, as VGG-16's conv5_3 in Show, Attend and Tell
        out = encoder.encode(images, train=train)
        grid = out["grid"].astype(jnp.float32)
        return out["pooled"], grid.reshape(grid.shape[0], -1, grid.shape[-1])
    if kind == "resnet":
        return encoder(images, train=train).astype(jnp.float32), None
    raise ValueError(f"image encoder kind {kind!r}: choose one of {ENCODERS}")


def variables_of(params: Any) -> dict:
    """Decoders take `params` or a whole variables dict (e.g. with BatchNorm's batch_stats)."""
    if isinstance(params, Mapping) and "params" in params:
        return dict(params)
    return {"params": params}


def zero_carry(batch: int, hidden: int) -> tuple[jax.Array, jax.Array]:
    z = jnp.zeros((batch, hidden), jnp.float32)
    return (z, z)


class _LSTMStep(nn.Module):
    """One LSTM step; rows with valid False keep their state (padding never changes it)."""

    hidden: int

    @nn.compact
    def __call__(self, carry, inputs):
        x, valid = inputs
        new, _ = LSTMCell(self.hidden, name="cell")(carry, x.astype(jnp.float32))
        new = tuple(jnp.where(valid[:, None], n, o) for n, o in zip(new, carry))
        return new, new[1]


# carry (c, h), (x [B, T, E], valid [B, T]) -> (carry, h [B, T, H]); one cell shared over time.
ScanLSTM = nn.scan(_LSTMStep, variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1)


class ShowTell(nn.Module):
    """(images [B,H,W,3], tokens int [B,L]) -> logits f32 [B, L, V] (logits[:, t] predict tokens[:, t+1])."""

    encoder: nn.Module
    encoder_kind: str = "cnn"
    freeze_encoder: bool = False
    vocab_size: int = 512
    embed_dim: int = 512
    hidden: int = 512
    dropout: float = 0.0
    image_norm: str = "none"  # none | layer | batch: a norm on the image embedding x_{-1}
    image_input: str = "once"  # once (the paper: x_{-1}) | every_step (beside each word; no t = -1)
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.image_proj = dense(self.embed_dim, ("embed", "mlp"), dtype=self.dtype)
        if self.image_input not in IMAGE_INPUTS:
            raise ValueError(f"image_input {self.image_input!r}: choose one of {IMAGE_INPUTS}")
        if self.image_norm not in IMAGE_NORMS:
            raise ValueError(f"image_norm {self.image_norm!r}: choose one of {IMAGE_NORMS}")
        if self.image_norm == "layer":
            self.image_ln = LayerNorm(1e-5, self.dtype, name="image_ln")
        elif self.image_norm == "batch":
            self.image_bn = nn.BatchNorm(
                momentum=0.9, epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            )
        self.embed = token_embedding(self.vocab_size, self.embed_dim, dtype=self.dtype)
        self.lstm = ScanLSTM(self.hidden)
        self.out = dense(self.vocab_size, ("mlp", "vocab"), dtype=self.dtype)
        self.drop = nn.Dropout(self.dropout)

    def encode(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images -> the image embedding x_{-1} f32 [B, embed_dim]."""
        vec, _ = encode_images(self.encoder, self.encoder_kind, images, train)
        if self.freeze_encoder:
            vec = jax.lax.stop_gradient(vec)
        x = self.image_proj(vec)
        if self.image_norm == "layer":
            x = self.image_ln(x)
        elif self.image_norm == "batch":
            x = self.image_bn(x, use_running_average=not train)
        return x.astype(jnp.float32)

    def _logits(self, h: jax.Array, train: bool) -> jax.Array:
        return self.out(self.drop(h, deterministic=not train)).astype(jnp.float32)

    def _inputs(self, tokens: jax.Array, img: jax.Array | None, train: bool) -> jax.Array:
        """The LSTM inputs of tokens [B, T]: word embeddings, with every_step the image beside each."""
        words = self.drop(self.embed(tokens).astype(jnp.float32), deterministic=not train)
        if self.image_input == "every_step":
            words = jnp.concatenate([words, jnp.broadcast_to(img[:, None], words.shape[:2] + img.shape[-1:])], -1)
        return words

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> jax.Array:
        img = self.encode(images, train)
        x = self._inputs(tokens, img, train)
        zero = zero_carry(x.shape[0], self.hidden)
        if self.image_input == "every_step":
            _, hs = self.lstm(zero, (x, jnp.ones(x.shape[:2], bool)))
            return self._logits(hs, train)
        x = jnp.concatenate([img[:, None], x], axis=1)
        _, hs = self.lstm(zero, (x, jnp.ones(x.shape[:2], bool)))
        return self._logits(hs[:, 1:], train)  # hs[:, 0] is the image step (t = -1)

    def init_state(self, images: jax.Array, train: bool = False) -> dict:
        """{"c", "h"}: the LSTM state after the image step t = -1 (every_step: zeros, plus "img",
        the image embedding fed beside each word)."""
        img = self.encode(images, train)
        zero = zero_carry(img.shape[0], self.hidden)
        if self.image_input == "every_step":
            return {"c": zero[0], "h": zero[1], "img": img}
        (c, h), _ = self.lstm(zero, (img[:, None], jnp.ones((img.shape[0], 1), bool)))
        return {"c": c, "h": h}

    def decode_step(self, state: dict, tokens: jax.Array, valid: jax.Array, train: bool = False):
        """Feeds tokens [B, T] (valid False: padding, state unchanged) -> (logits f32 [B, T, V], state)."""
        (c, h), hs = self.lstm((state["c"], state["h"]), (self._inputs(tokens, state.get("img"), train), valid))
        return self._logits(hs, train), dict(state, c=c, h=h)

    def make_decoder(self) -> "ShowTellDecoder":
        return ShowTellDecoder(self)


@dataclasses.dataclass(frozen=True)
class ShowTellDecoder:
    """vlm_jax.sampling.decode's `Decoder` for ShowTell: cache = {"c", "h"} f32 [B, hidden] (and
    "img" [B, embed_dim] with image_input every_step); context = images [B, H, W, 3] (required);
    positions are not needed by a recurrent model."""

    model: Any
    max_len: int | None = None

    def init_cache(self, params: Any, batch_size: int, context: Any = None) -> dict:
        if context is None:
            raise ValueError("a captioning decoder needs the images as context")
        if context.shape[0] != batch_size:
            raise ValueError(f"{context.shape[0]} images for {batch_size} prompts")
        return self.model.apply(variables_of(params), context, method="init_state")

    def step(self, params, cache, tokens, positions, valid):
        del positions
        return self.model.apply(variables_of(params), cache, tokens, valid, method="decode_step")

    def select(self, cache: dict, rows: jax.Array) -> dict:
        return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache)


def from_config(cfg: ml_collections.ConfigDict) -> ShowTell:
    """ShowTell from a model section (name, vocab_size, embed_dim, hidden, dropout, encoder)."""
    dtype = cfg.get("dtype", "float32")
    encoder, kind = build_encoder(cfg.encoder, dtype)
    return ShowTell(
        encoder=encoder,
        encoder_kind=kind,
        freeze_encoder=bool(cfg.encoder.get("freeze", False)),
        vocab_size=cfg.vocab_size,
        embed_dim=cfg.embed_dim,
        hidden=cfg.hidden,
        dropout=cfg.get("dropout", 0.0),
        image_norm=str(cfg.get("image_norm", "none")),
        image_input=str(cfg.get("image_input", "once")),
        dtype=jnp.dtype(dtype),
    )
