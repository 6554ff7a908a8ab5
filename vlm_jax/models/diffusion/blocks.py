"""The blocks of diffusers-style diffusion networks, NHWC, with logically named params: shared by
the UNet (`vlm_jax.models.unet`) and the KL autoencoder (`vlm_jax.models.autoencoder_kl`).

* `Settings`: what every block of one network shares (GroupNorm groups / eps, dtype, conv init, ...).
* `timestep_embedding`: the sinusoidal embedding of (possibly fractional) timesteps.
* `ResnetBlock`: GroupNorm -> SiLU -> conv3x3, [+ projected time embedding], GroupNorm -> SiLU ->
  dropout -> conv3x3, plus the input (through a 1x1 conv when the width changes). Without a time
  embedding (temb=None, the autoencoder) it has no time_emb_proj.
* `AttentionBlock`: GroupNorm -> multi-head self-attention over the H * W positions -> residual
  (the attention block of DDPM-style UNets; with one head, the autoencoder's mid-block attention).
* `SpatialTransformer`: GroupNorm -> proj_in -> `TransformerBlock`s (self-attention, optional
  cross-attention to a context sequence, GEGLU feed-forward; all pre-LayerNorm) -> proj_out ->
  residual (the transformer of latent-diffusion UNets).
* `downsample` / `upsample`: a stride-2 3x3 conv; nearest 2x upsampling and a 3x3 conv.
* `output_head`: GroupNorm -> SiLU -> 3x3 conv, the networks' last layers.
* `DownBlock`, `UpBlock`, `MidBlock`: ResNet blocks, each optionally followed by a transformer or an
  attention block, with down / upsampling (the UNet's; the autoencoder uses DownBlock and MidBlock
  without a time embedding).

GroupNorm is `vlm_jax.layers.norms.GroupNorm`, convs `vlm_jax.layers.conv.conv2d`. All attention
runs through `vlm_jax.kernels.attention` (via `layers.attention.MultiHeadAttention`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.attention import MultiHeadAttention
from vlm_jax.layers.conv import TORCH_DEFAULT_INIT, conv2d
from vlm_jax.layers.linear import dense
from vlm_jax.layers.norms import GroupNorm, LayerNorm


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every block of one network shares (hashable: a module attribute).

    groups / eps: GroupNorm of the ResNet blocks, self-attention blocks and the output;
    transformer_norm_eps: the GroupNorm before a SpatialTransformer (1e-6, as latent diffusion);
    layer_norm_eps: the transformer blocks' LayerNorms; cross_attention: whether transformer
    blocks cross-attend to the context; use_linear_projection: proj_in / proj_out as dense layers
    over the tokens rather than 1x1 convs; downsample_padding: see `downsample`; conv_init: the
    convs' kernel init (PyTorch's default; the autoencoder keeps layers.conv.FAN_IN_NORMAL).
    """

    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attn_impl: str = "auto"
    cross_attention: bool = True
    use_linear_projection: bool = False
    transformer_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    downsample_padding: int = 1
    conv_init: Any = TORCH_DEFAULT_INIT


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 10000.0
) -> jax.Array:
    """timesteps [B] (ints or floats) -> float32 [B, dim]: sin / cos of t * max_period ** (-i / (half - freq_shift))
    for i < half = dim // 2; [sin, cos], or [cos, sin] with flip_sin_to_cos; a zero column when dim is odd."""
    half = dim // 2
    if half - freq_shift == 0:
        raise ValueError(f"timestep embedding: dim {dim} with freq_shift {freq_shift} divides by zero")
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResnetBlock(nn.Module):
    """x [B, H, W, C], temb [B, T] or None -> [B, H, W, features]; params norm1, conv1,
    time_emb_proj (only with a temb), norm2, conv2 and, when C != features, conv_shortcut (1x1)."""

    features: int
    settings: Settings = Settings()

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, train: bool = False) -> jax.Array:
        s = self.settings
        h = nn.silu(GroupNorm(s.groups, s.eps, s.dtype, name="norm1")(x))
        h = conv2d(self.features, 3, s.dtype, "conv1", kernel_init=s.conv_init)(h)
        if temb is not None:
            t = dense(self.features, ("embed", "conv_out"), dtype=s.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(s.groups, s.eps, s.dtype, name="norm2")(h))
        h = nn.Dropout(s.dropout, deterministic=not train)(h)
        h = conv2d(self.features, 3, s.dtype, "conv2", kernel_init=s.conv_init)(h)
        if x.shape[-1] != self.features:
            x = conv2d(self.features, 1, s.dtype, "conv_shortcut", kernel_init=s.conv_init)(x)
        return x.astype(s.dtype) + h


class AttentionBlock(nn.Module):
    """Self-attention over the positions of x [B, H, W, C] -> [B, H, W, C] (residual); params
    group_norm and attention {query, key, value [C, heads, C // heads], out} (with biases)."""

    heads: int
    settings: Settings = Settings()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.settings
        b, hgt, wid, c = x.shape
        if c % self.heads:
            raise ValueError(f"attention block: {c} channels are not divisible by {self.heads} heads")
        h = GroupNorm(s.groups, s.eps, s.dtype, name="group_norm")(x).reshape(b, hgt * wid, c)
        h = MultiHeadAttention(self.heads, dtype=s.dtype, impl=s.attn_impl, name="attention")(h)
        return x.astype(s.dtype) + h.reshape(b, hgt, wid, c)


class FeedForward(nn.Module):
    """GEGLU feed-forward [B, T, E] -> [B, T, E]: proj [E, 2 * inner] (value half, then gate half),
    value * gelu(gate), out [inner, E]."""

    inner: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(2 * self.inner, ("embed", "mlp"), dtype=self.dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        h = value * jax.nn.gelu(gate, approximate=False)
        return dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="out")(h)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block on tokens [B, T, E]: norm1 -> attn1 (self), [norm2 -> attn2 (to the
    context, keys / values from its own width)], norm3 -> ff (GEGLU, inner 4 E); no q/k/v biases."""

    heads: int
    settings: Settings = Settings()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        s = self.settings
        attn = dict(qkv_bias=False, dtype=s.dtype, impl=s.attn_impl)
        x = x + MultiHeadAttention(self.heads, name="attn1", **attn)(
            LayerNorm(s.layer_norm_eps, s.dtype, name="norm1")(x)
        )
        if s.cross_attention:
            x = x + MultiHeadAttention(self.heads, name="attn2", **attn)(
                LayerNorm(s.layer_norm_eps, s.dtype, name="norm2")(x), context.astype(s.dtype)
            )
        h = LayerNorm(s.layer_norm_eps, s.dtype, name="norm3")(x)
        return x + FeedForward(4 * x.shape[-1], s.dtype, name="ff")(h)


class SpatialTransformer(nn.Module):
    """x [B, H, W, C] (+ context [B, L, D]) -> [B, H, W, C]: norm (GroupNorm, eps 1e-6), proj_in
    (1x1 conv, or a dense over the flattened tokens with use_linear_projection), `depth`
    TransformerBlocks transformer_blocks_{k} on the H * W tokens, proj_out likewise, residual."""

    heads: int
    depth: int = 1
    settings: Settings = Settings()

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        s = self.settings
        b, hgt, wid, c = x.shape
        if c % self.heads:
            raise ValueError(f"transformer: {c} channels are not divisible by {self.heads} heads")
        h = GroupNorm(s.groups, s.transformer_norm_eps, s.dtype, name="norm")(x)
        if s.use_linear_projection:
            h = dense(c, ("conv_in", "embed"), dtype=s.dtype, name="proj_in")(h.reshape(b, hgt * wid, c))
        else:
            h = conv2d(c, 1, s.dtype, "proj_in", kernel_init=s.conv_init)(h).reshape(b, hgt * wid, c)
        for k in range(self.depth):
            h = TransformerBlock(self.heads, s, name=f"transformer_blocks_{k}")(h, context)
        if s.use_linear_projection:
            h = dense(c, ("embed", "conv_out"), dtype=s.dtype, name="proj_out")(h).reshape(b, hgt, wid, c)
        else:
            h = conv2d(c, 1, s.dtype, "proj_out", kernel_init=s.conv_init)(h.reshape(b, hgt, wid, c))
        return x.astype(s.dtype) + h


def downsample(x: jax.Array, settings: Settings, name: str) -> jax.Array:
    """A stride-2 3x3 conv (padding 1 each side, or with downsample_padding 0 one zero row / column
    after the ends, as diffusers): [B, H, W, C] -> [B, ceil(H / 2), ceil(W / 2), C]."""
    p = settings.downsample_padding
    padding = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
    return conv2d(x.shape[-1], 3, settings.dtype, name, 2, padding, settings.conv_init)(x)


def upsample(x: jax.Array, settings: Settings, name: str) -> jax.Array:
    """Nearest 2x upsampling then a 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv2d(x.shape[-1], 3, settings.dtype, name, kernel_init=settings.conv_init)(x)


def output_head(x: jax.Array, features: int, settings: Settings) -> jax.Array:
    """conv_norm_out (GroupNorm) -> SiLU -> conv_out (3x3): [B, H, W, C] -> [B, H, W, features], the
    last layers of the UNet and of the autoencoder's encoder and decoder."""
    x = nn.silu(GroupNorm(settings.groups, settings.eps, settings.dtype, name="conv_norm_out")(x))
    return conv2d(features, 3, settings.dtype, "conv_out", kernel_init=settings.conv_init)(x)


def _mix(kind: str, heads: int, depth: int, settings: Settings, name: str) -> nn.Module | None:
    """The layer that follows a ResNet block, by `kind`: "transformer" a SpatialTransformer (`depth`
    TransformerBlocks), "attention" an AttentionBlock, "" none; `heads` attention heads."""
    if kind == "transformer":
        return SpatialTransformer(heads, depth, settings, name=name)
    if kind == "attention":
        return AttentionBlock(heads, settings, name=name)
    return None


def _apply_mix(layer: nn.Module | None, x: jax.Array, context: jax.Array | None) -> jax.Array:
    if isinstance(layer, SpatialTransformer):
        return layer(x, context)
    return x if layer is None else layer(x)


class DownBlock(nn.Module):
    """`num_layers` x (resnets_{j} [+ attentions_{j}]) [+ downsample]: returns (x, the skips).

    The down / up / mid blocks take temb [B, T] or None (ResNets without time_emb_proj) and
    context [B, L, D] or None (read by cross-attending transformers only); `kind` as `_mix`."""

    features: int
    num_layers: int
    kind: str  # "" | "transformer" | "attention"
    heads: int
    depth: int
    add_downsample: bool
    settings: Settings

    @nn.compact
    def __call__(self, x, temb, context, train: bool = False) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for j in range(self.num_layers):
            x = ResnetBlock(self.features, self.settings, name=f"resnets_{j}")(x, temb, train)
            x = _apply_mix(_mix(self.kind, self.heads, self.depth, self.settings, f"attentions_{j}"), x, context)
            skips.append(x)
        if self.add_downsample:
            x = downsample(x, self.settings, "downsample")
            skips.append(x)
        return x, tuple(skips)


class UpBlock(nn.Module):
    """For each skip (last first): concatenate, resnets_{j} [+ attentions_{j}]; [+ upsample]."""

    features: int
    kind: str
    heads: int
    depth: int
    add_upsample: bool
    settings: Settings

    @nn.compact
    def __call__(self, x, skips: tuple[jax.Array, ...], temb, context, train: bool = False) -> jax.Array:
        for j, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = ResnetBlock(self.features, self.settings, name=f"resnets_{j}")(x, temb, train)
            x = _apply_mix(_mix(self.kind, self.heads, self.depth, self.settings, f"attentions_{j}"), x, context)
        if self.add_upsample:
            x = upsample(x, self.settings, "upsample")
        return x


class MidBlock(nn.Module):
    """resnets_0, then `num_layers` x ([attentions_{l}] -> resnets_{l+1}), at the lowest resolution."""

    kind: str
    heads: int
    depth: int
    num_layers: int
    settings: Settings

    @nn.compact
    def __call__(self, x, temb, context, train: bool = False) -> jax.Array:
        features = x.shape[-1]
        x = ResnetBlock(features, self.settings, name="resnets_0")(x, temb, train)
        for k in range(self.num_layers):
            x = _apply_mix(_mix(self.kind, self.heads, self.depth, self.settings, f"attentions_{k}"), x, context)
            x = ResnetBlock(features, self.settings, name=f"resnets_{k + 1}")(x, temb, train)
        return x
