"""A diffusion UNet (Ronneberger et al. 2015; Ho et al. 2020; Rombach et al. 2022), NHWC, laid out
as diffusers' `UNet2DConditionModel` so that its weights import exactly (vlm_jax.convert.diffusers_unet).

Call: `model.apply({"params": p}, x, timesteps, context=None, pooled=None, train=False)`:
x [B, H, W, in_channels] (H, W divisible by 2 ** (number of blocks - 1)), timesteps [B] or a scalar
(ints or floats), context [B, L, cross_attention_dim] (needed when some block cross-attends; ignored
by a UNet without cross-attention, so one sampler drives both), pooled [B, pooled_dim] (needed iff
pooled_dim > 0) -> float32 [B, H, W, out_channels]. train=True enables dropout ("dropout" rng).

Structure: sinusoidal timestep embedding (block_out_channels[0] wide) -> time_embedding (dense,
SiLU, dense to time_embed_dim), plus pooled_embedding(pooled) when pooled_dim > 0; conv_in (3x3);
down blocks, each `layers_per_block` ResNet blocks (each followed by a transformer or an attention
block, by block type) and, but for the last, a stride-2 downsampling conv; a mid block (resnet,
[transformer or attention], resnet); up blocks mirroring them with `layers_per_block + 1` ResNet
blocks, each reading the concatenation with one skip activation, and, but for the last, a nearest
2x upsampling and conv; GroupNorm -> SiLU -> conv_out (3x3).

Config keys (the model section; `from_config` rejects unknown ones):
  name: "unet".
  in_channels, out_channels: image / latent channels in and out (default 4, 4).
  block_out_channels: widths per resolution level, e.g. (320, 640, 1280, 1280).
  layers_per_block: ResNet blocks per down block, int or a tuple per block (up blocks: + 1).
  down_block_types: per level "DownBlock2D" (ResNets only), "CrossAttnDownBlock2D" (ResNets, each
    followed by a SpatialTransformer) or "AttnDownBlock2D" (each followed by a self-attention block).
  up_block_types: likewise "UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D", from the lowest
    resolution up; as many as down blocks.
  mid_block_type: "UNetMidBlock2DCrossAttn" (resnet, transformer, resnet), "UNetMidBlock2D"
    (resnet, self-attention block, resnet; mid_block_add_attention=False drops the attention) or
    "" (no mid block). mid_block_layers: the (attention, resnet) pairs after the first resnet (1;
    diffusers' UNet2DConditionModel builds its "UNetMidBlock2D" with 0: a single resnet).
  attention_head_dim: int or a tuple per down block; as in UNet2DConditionModel it is the number of
    heads (diffusers' misnomer), for every attention layer here: transformers and attention blocks.
  num_attention_heads: int or a tuple per down block; overrides attention_head_dim when set.
    Up block i uses the heads of down block n - 1 - i; the mid block those of the last down block.
  cross_attention_dim: context width; 0: the transformers have no cross-attention.
  use_linear_projection: transformers' proj_in / proj_out as dense layers (SD2) or 1x1 convs (SD1).
  transformer_layers_per_block: transformer blocks per SpatialTransformer, int or a tuple per
    down block (reversed for the up blocks; the mid block uses the last).
  norm_num_groups, norm_eps: GroupNorm of the ResNet / attention blocks and the output (32, 1e-5).
  flip_sin_to_cos, freq_shift: timestep embedding order ([cos, sin]) and frequency shift (SD: True, 0).
  time_embed_dim: width of the time embedding; 0 means 4 * block_out_channels[0].
  downsample_padding: 1 (default) or 0 (pad one row / column at the ends, as diffusers).
  pooled_dim: width of an optional pooled condition added to the time embedding (0: none);
    pooled_embed_type "linear" (one dense) or "mlp" (dense, SiLU, dense).
  dropout: ResNet blocks' dropout rate. dtype: compute dtype (params stay float32).
  attn_impl: vlm_jax.kernels.attention implementation ("auto").
  only_cross_attention, upcast_attention: accepted only as False. sample_size: informational (the
    training image side). scan_layers: accepted only as False (a UNet's blocks differ).

Param tree (under "params"): time_embedding {linear_1, linear_2}; pooled_embedding {linear_1
[, linear_2]}; conv_in; down_blocks_{i} {resnets_{j}, attentions_{j}, downsample}; mid_block
{resnets_0, attentions_0, resnets_1, ...}; up_blocks_{i} {resnets_{j}, attentions_{j}, upsample};
conv_norm_out; conv_out. The blocks are models.diffusion.blocks'. A resnet: norm1, conv1,
time_emb_proj, norm2, conv2[, conv_shortcut]. A transformer (SpatialTransformer): norm, proj_in,
transformer_blocks_{k} {norm1, attn1, norm2, attn2, norm3, ff {proj, out}}, proj_out; attn* {query,
key, value [E, heads, head_dim], out [heads, head_dim, E]}. An attention block: group_norm,
attention {query, key, value, out}. Convs are HWIO kernels (None, None, "conv_in", "conv_out");
every param has logical axes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.kernels.attention import IMPLEMENTATIONS
from vlm_jax.layers.conv import conv2d
from vlm_jax.layers.linear import dense
from vlm_jax.models.diffusion.blocks import (
    DownBlock, MidBlock, Settings, UpBlock, output_head, timestep_embedding,
)

DOWN_BLOCKS = {"DownBlock2D": "", "CrossAttnDownBlock2D": "transformer", "AttnDownBlock2D": "attention"}
UP_BLOCKS = {"UpBlock2D": "", "CrossAttnUpBlock2D": "transformer", "AttnUpBlock2D": "attention"}
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", "")
POOLED_EMBED_TYPES = ("linear", "mlp")


def per_block(value: Any, n: int, key: str) -> tuple:
    """An int (or None) for every block, or a tuple of n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"unet: {key} has {len(value)} entries for {n} down blocks: {tuple(value)}")
        return tuple(value)
    return (value,) * n


class UNet(nn.Module):
    """The UNet of the module docstring; attributes are its config keys (tuples or ints per block)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    mid_block_add_attention: bool = True
    mid_block_layers: int = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 1280
    use_linear_projection: bool = False
    transformer_layers_per_block: int | tuple[int, ...] = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embed_dim: int = 0
    downsample_padding: int = 1
    pooled_dim: int = 0
    pooled_embed_type: str = "linear"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attn_impl: str = "auto"

    def __post_init__(self) -> None:
        self._check()
        super().__post_init__()

    def _check(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("unet: block_out_channels is empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"unet: {n} block_out_channels but {len(self.down_block_types)} down_block_types and "
                f"{len(self.up_block_types)} up_block_types; give one of each per resolution level"
            )
        for types, known in ((self.down_block_types, DOWN_BLOCKS), (self.up_block_types, UP_BLOCKS)):
            for t in types:
                if t not in known:
                    raise ValueError(f"unet: block type {t!r} is not built here; choose from {sorted(known)}")
        if self.mid_block_type not in MID_BLOCKS:
            raise ValueError(f"unet: mid_block_type {self.mid_block_type!r}: choose from {MID_BLOCKS}")
        for c in self.block_out_channels:
            if c <= 0 or c % self.norm_num_groups:
                raise ValueError(
                    f"unet: block_out_channels {tuple(self.block_out_channels)}: each must be a positive "
                    f"multiple of norm_num_groups={self.norm_num_groups}"
                )
        for key in ("layers_per_block", "transformer_layers_per_block"):
            if any(int(v) < 1 for v in per_block(getattr(self, key), n, key)):
                raise ValueError(f"unet: {key} must be >= 1, got {getattr(self, key)}")
        heads = self.heads
        for r, c in enumerate(self.block_out_channels):
            uses = [DOWN_BLOCKS[self.down_block_types[r]], UP_BLOCKS[self.up_block_types[n - 1 - r]]]
            if r == n - 1 and self.mid_block_type and self.mid_block_layers:
                uses.append(self.mid_block_type == "UNetMidBlock2DCrossAttn" or self.mid_block_add_attention)
            if any(uses) and (heads[r] is None or heads[r] < 1 or c % heads[r]):
                raise ValueError(f"unet: {c} channels (level {r}) are not divisible into {heads[r]} attention heads")
        if self.cross_attention_dim < 0 or self.pooled_dim < 0:
            raise ValueError("unet: cross_attention_dim and pooled_dim must be >= 0")
        if self.pooled_embed_type not in POOLED_EMBED_TYPES:
            raise ValueError(f"unet: pooled_embed_type {self.pooled_embed_type!r}: choose from {POOLED_EMBED_TYPES}")
        if self.mid_block_layers < 0:
            raise ValueError(f"unet: mid_block_layers must be >= 0, got {self.mid_block_layers}")
        if self.attn_impl not in IMPLEMENTATIONS:
            raise ValueError(f"unet: attn_impl {self.attn_impl!r}: choose from {IMPLEMENTATIONS}")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"unet: downsample_padding must be 0 or 1, got {self.downsample_padding}")

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (num_attention_heads, else attention_head_dim)."""
        n = len(self.block_out_channels)
        if self.num_attention_heads is not None:
            return per_block(self.num_attention_heads, n, "num_attention_heads")
        return per_block(self.attention_head_dim, n, "attention_head_dim")

    @property
    def cross_attends(self) -> bool:
        """Whether some transformer attends to the context."""
        mix = [DOWN_BLOCKS[t] for t in self.down_block_types] + [UP_BLOCKS[t] for t in self.up_block_types]
        mid = self.mid_block_type == "UNetMidBlock2DCrossAttn"
        return self.cross_attention_dim > 0 and ("transformer" in mix or mid)

    def _settings(self) -> Settings:
        return Settings(
            groups=self.norm_num_groups, eps=self.norm_eps, dropout=self.dropout, dtype=jnp.dtype(self.dtype),
            attn_impl=self.attn_impl, cross_attention=self.cross_attention_dim > 0,
            use_linear_projection=self.use_linear_projection, downsample_padding=self.downsample_padding,
        )

    def _check_inputs(self, x, timesteps, context, pooled) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"unet: x must be [B, H, W, {self.in_channels}], got {x.shape}")
        factor = 2 ** (len(self.block_out_channels) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"unet: H and W must be multiples of {factor}, got {x.shape[1:3]}")
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim == 0:
            timesteps = jnp.broadcast_to(timesteps, (x.shape[0],))
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"unet: timesteps must be a scalar or [{x.shape[0]}], got {timesteps.shape}")
        if self.cross_attends:
            if context is None:
                raise ValueError(f"unet: this UNet cross-attends: pass context [B, L, {self.cross_attention_dim}]")
            if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.cross_attention_dim:
                raise ValueError(
                    f"unet: context must be [{x.shape[0]}, L, {self.cross_attention_dim}], got {context.shape}"
                )
        if self.pooled_dim and (pooled is None or pooled.shape != (x.shape[0], self.pooled_dim)):
            got = None if pooled is None else pooled.shape
            raise ValueError(
                f"unet: pooled_dim={self.pooled_dim}: pass pooled [{x.shape[0]}, {self.pooled_dim}], got {got}"
            )
        if not self.pooled_dim and pooled is not None:
            raise ValueError("unet: pooled given but pooled_dim is 0")
        return timesteps

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        timesteps: jax.Array,
        context: jax.Array | None = None,
        pooled: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """x [B, H, W, in_channels], timesteps [B] or scalar, context [B, L, D] | None, pooled
        [B, P] | None -> float32 [B, H, W, out_channels] (see the module docstring)."""
        timesteps = self._check_inputs(x, timesteps, context, pooled)
        s = self._settings()
        context = context if self.cross_attends else None
        channels = tuple(self.block_out_channels)
        n = len(channels)
        layers = per_block(self.layers_per_block, n, "layers_per_block")
        depths = per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        heads = self.heads

        temb_dim = self.time_embed_dim or 4 * channels[0]
        temb = timestep_embedding(timesteps, channels[0], self.flip_sin_to_cos, self.freq_shift).astype(s.dtype)
        temb = _TimeEmbedding(temb_dim, True, s.dtype, name="time_embedding")(temb)
        if self.pooled_dim:
            mlp = self.pooled_embed_type == "mlp"
            temb = temb + _TimeEmbedding(temb_dim, mlp, s.dtype, name="pooled_embedding")(pooled.astype(s.dtype))

        h = conv2d(channels[0], 3, s.dtype, "conv_in", kernel_init=s.conv_init)(x.astype(s.dtype))
        skips = [h]
        for i, kind in enumerate(self.down_block_types):
            h, block_skips = DownBlock(
                channels[i], int(layers[i]), DOWN_BLOCKS[kind], int(heads[i] or 0), int(depths[i]), i < n - 1, s,
                name=f"down_blocks_{i}",
            )(h, temb, context, train)
            skips.extend(block_skips)

        if self.mid_block_type:
            cross = self.mid_block_type == "UNetMidBlock2DCrossAttn"
            kind = "transformer" if cross else ("attention" if self.mid_block_add_attention else "")
            h = MidBlock(kind, int(heads[-1] or 0), int(depths[-1]), self.mid_block_layers, s, name="mid_block")(
                h, temb, context, train
            )

        for i, kind in enumerate(self.up_block_types):
            r = n - 1 - i
            count = int(layers[r]) + 1
            block_skips, skips = tuple(skips[-count:]), skips[:-count]
            h = UpBlock(
                channels[r], UP_BLOCKS[kind], int(heads[r] or 0), int(depths[r]), i < n - 1, s, name=f"up_blocks_{i}"
            )(h, block_skips, temb, context, train)

        return output_head(h, self.out_channels, s).astype(jnp.float32)


class _TimeEmbedding(nn.Module):
    """[B, In] -> [B, features]: linear_1 [-> SiLU -> linear_2] (diffusers' TimestepEmbedding)."""

    features: int
    two_layers: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.two_layers:
            return dense(self.features, ("embed", "mlp"), dtype=self.dtype, name="linear_1")(x)
        h = nn.silu(dense(self.features, ("embed", "mlp"), dtype=self.dtype, name="linear_1")(x))
        return dense(self.features, ("mlp", "embed"), dtype=self.dtype, name="linear_2")(h)


_KEYS = {f.name for f in UNet.__dataclass_fields__.values() if f.name not in ("parent", "name")}
_EXTRA_KEYS = {"name", "only_cross_attention", "upcast_attention", "sample_size", "scan_layers"}


def _tuple_or_int(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def from_config(cfg: ml_collections.ConfigDict) -> UNet:
    """The UNet of a model section (keys in the module docstring); ValueError on unknown or
    unsupported keys."""
    keys = set(cfg.keys())
    unknown = keys - _KEYS - _EXTRA_KEYS
    if unknown:
        raise ValueError(f"unet config: unknown keys {sorted(unknown)}; known: {sorted(_KEYS | _EXTRA_KEYS)}")
    for key in ("only_cross_attention", "upcast_attention", "scan_layers"):
        if cfg.get(key, False):
            raise ValueError(f"unet config: {key}=True is not supported")
    kw: dict[str, Any] = {}
    for key in _KEYS & keys:
        kw[key] = _tuple_or_int(cfg[key])
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in kw:
            kw[key] = tuple(kw[key])
    if "mid_block_type" in kw:
        kw["mid_block_type"] = kw["mid_block_type"] or ""
    kw["dtype"] = jnp.dtype(cfg.get("dtype", "float32"))
    return UNet(**kw)
