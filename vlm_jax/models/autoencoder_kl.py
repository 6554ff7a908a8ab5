"""KL-regularised convolutional autoencoder: the first stage of latent diffusion (Rombach et al. 2022),
laid out as diffusers' AutoencoderKL so that Stable Diffusion's VAE converts one to one
(`vlm_jax.convert.diffusers_vae`). NHWC throughout.

* Encoder: 3x3 conv_in to block_out_channels[0]; per entry of block_out_channels a down block of
  `layers_per_block` resnets (then, except after the last, a stride-2 3x3 conv that first pads one
  zero row / column at the bottom / right, as diffusers does); a mid block (resnet, single-head
  self-attention over the H*W positions, resnet); GroupNorm -> SiLU -> 3x3 conv to 2 * latent_channels
  (the mean and log variance); then the 1x1 quant_conv.
* Decoder: 1x1 post_quant_conv, 3x3 conv_in to block_out_channels[-1], mid block, up blocks in the
  reverse order of widths with `layers_per_block + 1` resnets each and (except after the last) a 2x
  nearest upsampling followed by a 3x3 conv; GroupNorm -> SiLU -> 3x3 conv_out to out_channels.
* Resnet: GroupNorm -> SiLU -> conv3x3, twice, added to x (through a 1x1 conv_shortcut when the width
  changes); no time embedding. GroupNorms have eps 1e-6 and float32 statistics.

The resnets, the mid block, the attention block, down / upsampling and the output layers are
`vlm_jax.models.diffusion.blocks`' (shared with the UNet), run without a time embedding; convs start
from layers.conv.FAN_IN_NORMAL.

An image of side S becomes a latent of side S / 2**(len(block_out_channels) - 1).

Param tree (params float32; every leaf has logical axis names):
  encoder/conv_in/{kernel [3,3,C_in,c0], bias}
  encoder/down_blocks_i/resnets_j/{norm1,norm2}/{scale,bias}, {conv1,conv2,conv_shortcut?}/{kernel,bias}
  encoder/down_blocks_i/downsample/{kernel,bias}            (every block but the last)
  encoder/mid_block/{resnets_0, attentions_0, resnets_1}    (attentions_0: mid_block_add_attention)
      attentions_0/group_norm/{scale,bias},
      attentions_0/attention/{query,key,value}/{kernel [C,1,C], bias [1,C]} (one head),
      attentions_0/attention/out/{kernel [1,C,C], bias [C]}
  encoder/conv_norm_out/{scale,bias}, encoder/conv_out/{kernel [3,3,c_last,2L], bias}
  quant_conv/{kernel [1,1,2L,2L], bias}, post_quant_conv/{kernel [1,1,L,L], bias}   (when enabled)
  decoder/conv_in, decoder/mid_block/..., decoder/up_blocks_i/resnets_j (j <= layers_per_block),
  decoder/up_blocks_i/upsample (every block but the last), decoder/conv_norm_out, decoder/conv_out

Config keys (diffusers' names): in_channels (3), out_channels (3), latent_channels (4),
block_out_channels ((64,)), layers_per_block (1), norm_num_groups (32), down_block_types
(("DownEncoderBlock2D",) per block), up_block_types (("UpDecoderBlock2D",) per block),
mid_block_add_attention (True), use_quant_conv (True), use_post_quant_conv (True), scaling_factor
(0.18215) and shift_factor (0.0), recorded for the diffusion pipeline (latents = (z - shift) *
scale); dtype ("float32", the compute dtype) and attn_impl ("auto", see vlm_jax.kernels.attention).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers.conv import FAN_IN_NORMAL, conv2d
from vlm_jax.models.diffusion.blocks import DownBlock, MidBlock, ResnetBlock, Settings, output_head, upsample

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers' DiagonalGaussianDistribution clips the log variance
_NORM_EPS = 1e-6


def block_settings(groups: int, dtype: Any = jnp.float32, attn_impl: str = "auto") -> Settings:
    """The shared blocks' settings for the autoencoder: GroupNorm eps 1e-6, no dropout, downsampling
    that pads one zero row / column at the bottom / right only (as diffusers), FAN_IN_NORMAL convs."""
    return Settings(
        groups=groups, eps=_NORM_EPS, dtype=dtype, attn_impl=attn_impl, cross_attention=False,
        downsample_padding=0, conv_init=FAN_IN_NORMAL,
    )


def _mid_block(settings: Settings, attention: bool) -> MidBlock:
    """resnets_0 -> [attentions_0: single-head self-attention over the H*W positions] -> resnets_1."""
    return MidBlock("attention" if attention else "", 1, 1, 1, settings, name="mid_block")


class UpDecoderBlock(nn.Module):
    """diffusers' UpDecoderBlock2D: `layers` resnets to `features` (no skips, no time embedding),
    then (add_upsample) 2x nearest upsampling and a 3x3 conv."""

    features: int
    layers: int
    add_upsample: bool
    settings: Settings

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.layers):
            x = ResnetBlock(self.features, self.settings, name=f"resnets_{j}")(x)
        return upsample(x, self.settings, "upsample") if self.add_upsample else x


class _Tower(nn.Module):
    """What the encoder and the decoder are built from: widths per level (encoder order), resnets
    per down block, output channels, the blocks' settings, whether the mid block attends."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_features: int
    settings: Settings
    mid_attention: bool = True


class Encoder(_Tower):
    """images [B, S, S, C_in] -> [B, S/f, S/f, out_features] (before quant_conv)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s, chans = self.settings, self.block_out_channels
        x = conv2d(chans[0], 3, s.dtype, "conv_in", kernel_init=s.conv_init)(x.astype(s.dtype))
        for i, c in enumerate(chans):  # diffusers' DownEncoderBlock2D: resnets, no attention
            block = DownBlock(
                c, self.layers_per_block, kind="", heads=0, depth=1, add_downsample=i < len(chans) - 1, settings=s,
                name=f"down_blocks_{i}",
            )
            x, _ = block(x, None, None)
        x = _mid_block(s, self.mid_attention)(x, None, None)
        return output_head(x, self.out_features, s)


class Decoder(_Tower):
    """latents [B, h, w, L] (after post_quant_conv) -> [B, h*f, w*f, out_features]."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        s, chans = self.settings, tuple(reversed(self.block_out_channels))
        x = conv2d(chans[0], 3, s.dtype, "conv_in", kernel_init=s.conv_init)(z.astype(s.dtype))
        x = _mid_block(s, self.mid_attention)(x, None, None)
        for i, c in enumerate(chans):
            x = UpDecoderBlock(c, self.layers_per_block + 1, i < len(chans) - 1, s, name=f"up_blocks_{i}")(x)
        return output_head(x, self.out_features, s)


def kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) of each example, summed over all latent entries:
    mean, logvar [B, ...] -> float32 [B]."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    per_entry = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(per_entry.reshape(per_entry.shape[0], -1), axis=-1)


def check_config(
    block_out_channels: tuple[int, ...], down_block_types: tuple[str, ...], up_block_types: tuple[str, ...],
    layers_per_block: int, norm_num_groups: int, latent_channels: int,
) -> None:
    """Raises ValueError for a layout this module does not build."""
    n = len(block_out_channels)
    if n == 0 or any(int(c) <= 0 for c in block_out_channels):
        raise ValueError(f"autoencoder_kl: block_out_channels must be positive widths, got {block_out_channels}")
    for key, types, known in (("down_block_types", down_block_types, DOWN_BLOCK_TYPES),
                              ("up_block_types", up_block_types, UP_BLOCK_TYPES)):
        if len(types) != n:
            raise ValueError(f"autoencoder_kl: {key} has {len(types)} entries, block_out_channels {n}")
        unknown = sorted(set(types) - set(known))
        if unknown:
            raise ValueError(f"autoencoder_kl: {key} {unknown} are not supported; known: {known}")
    if layers_per_block < 1:
        raise ValueError(f"autoencoder_kl: layers_per_block must be >= 1, got {layers_per_block}")
    if latent_channels < 1:
        raise ValueError(f"autoencoder_kl: latent_channels must be >= 1, got {latent_channels}")
    bad = [c for c in block_out_channels if norm_num_groups < 1 or c % norm_num_groups]
    if bad:
        raise ValueError(
            f"autoencoder_kl: norm_num_groups {norm_num_groups} does not divide block_out_channels {bad}"
        )


class AutoencoderKL(nn.Module):
    """Stable Diffusion's VAE; see the module doc. Methods: encode, decode, reconstruct, __call__, kl."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    down_block_types: tuple[str, ...] = DOWN_BLOCK_TYPES
    up_block_types: tuple[str, ...] = UP_BLOCK_TYPES
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    dtype: Any = jnp.float32
    attn_impl: str = "auto"

    kl = staticmethod(kl)

    def __post_init__(self) -> None:
        check_config(
            tuple(self.block_out_channels), tuple(self.down_block_types), tuple(self.up_block_types),
            self.layers_per_block, self.norm_num_groups, self.latent_channels,
        )
        super().__post_init__()

    def setup(self) -> None:
        s = block_settings(self.norm_num_groups, self.dtype, self.attn_impl)
        common = dict(
            block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
            settings=s, mid_attention=self.mid_block_add_attention,
        )
        self.encoder = Encoder(out_features=2 * self.latent_channels, **common)
        self.decoder = Decoder(out_features=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = conv2d(2 * self.latent_channels, 1, s.dtype, "quant_conv", kernel_init=s.conv_init)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv2d(self.latent_channels, 1, s.dtype, "post_quant_conv", kernel_init=s.conv_init)

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, in_channels] (H, W divisible by downsample_factor) -> (mean, logvar),
        float32 [B, H/f, W/f, latent_channels], unscaled (no scaling_factor); logvar in [-30, 20]."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"autoencoder_kl.encode wants [B, H, W, {self.in_channels}] with H, W divisible by {f}, "
                f"got {x.shape}"
            )
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """latents [B, h, w, latent_channels] (unscaled) -> float32 images [B, h*f, w*f, out_channels]."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"autoencoder_kl.decode wants [B, h, w, {self.latent_channels}], got {z.shape}")
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def reconstruct(self, x: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> decode(the posterior mean): the deterministic round trip (what latent
        diffusion's decode of an encoded image gives; evals.reconstruction scores it)."""
        return self.decode(self.encode(x)[0])

    def __call__(
        self, x: jax.Array, train: bool = False, sample_rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """images [B, H, W, C] -> dict(mean, logvar, z [B, h, w, L], kl [B], reconstruction [B, H, W, C]).

        z = mean + exp(logvar / 2) * noise, the noise from `sample_rng` when given, else from the
        "dropout" rng stream when train=True; otherwise z is the mean."""
        mean, logvar = self.encode(x)
        if sample_rng is None and train:
            sample_rng = self.make_rng("dropout")
        if sample_rng is None:
            z = mean
        else:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(sample_rng, mean.shape, jnp.float32)
        return dict(mean=mean, logvar=logvar, z=z, kl=kl(mean, logvar), reconstruction=self.decode(z))


def from_config(cfg: ml_collections.ConfigDict) -> AutoencoderKL:
    """AutoencoderKL from a model section (keys in the module doc)."""
    chans = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
    return AutoencoderKL(
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
        latent_channels=int(cfg.get("latent_channels", 4)),
        block_out_channels=chans,
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        down_block_types=tuple(cfg.get("down_block_types", DOWN_BLOCK_TYPES * len(chans))),
        up_block_types=tuple(cfg.get("up_block_types", UP_BLOCK_TYPES * len(chans))),
        mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
        shift_factor=float(cfg.get("shift_factor", None) or 0.0),
        dtype=jnp.dtype(cfg.get("dtype", "float32")),
        attn_impl=str(cfg.get("attn_impl", "auto")),
    )
