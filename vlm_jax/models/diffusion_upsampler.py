"""Diffusion upsamplers (unCLIP, Ramesh et al. 2022; after SR3, Saharia et al. 2021, and cascaded
diffusion, Ho et al. 2022): a UNet denoiser at the high resolution S conditioned on a
low-resolution image of side S / factor, on top of any text-to-image model of this repo.

The denoiser's input is [x_t; bilinear upsample of the low-resolution image to S] on the channels
(3 + 3 = the UNet's in_channels 6; out_channels 3). unCLIP's upsamplers take no caption, so the
UNet should have no cross-attention (DownBlock2D / UpBlock2D, a "UNetMidBlock2D" or no mid block):
it is given no context. With unet.pooled_dim > 0 the UNet also reads the conditioning's noise
level g in [0, 1] (tasks.diffusion_upsample's noise augmentation), as the sinusoidal embedding of
1000 g (pooled_dim wide) through its pooled input, which it adds to the time embedding.

`base` is the whole model of the previous stage (models.build of that run's model section: a
text-to-image model such as models.text_diffusion, or another upsampler, so cascades stack),
frozen: its params (and model state) are loaded by train.init_from_map "base:." and kept out of
training by optim.trainable "^(?!base/)". The loss never calls it; tasks.diffusion_upsample's
generate draws the low-resolution images with it. None: an upsampler trained alone (on a user's
own low-resolution images, or in tests).

Param tree: unet/... (models.unet) and base/... (the previous stage's whole tree); model state:
the base's, under base/ in its collections.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import models
from vlm_jax.data import degrade
from vlm_jax.models import unet as unet_lib
from vlm_jax.models.diffusion.blocks import timestep_embedding

LEVEL_SCALE = 1000.0  # a noise level g in [0, 1] is embedded like the timestep 1000 g


class DiffusionUpsampler(nn.Module):
    """A low-resolution-conditioned denoiser; `__call__(images, tokens)` runs every part once (init)."""

    base: nn.Module | None
    unet: nn.Module
    factor: int = 2

    @property
    def reads_level(self) -> bool:
        """Whether the UNet reads the conditioning's noise level (unet.pooled_dim > 0)."""
        return self.unet.pooled_dim > 0

    def condition_input(self, low_res: jax.Array, size: int) -> jax.Array:
        """low_res [B, s, s, 3] -> its bilinear upsample [B, size, size, 3] (size = s * factor)."""
        if low_res.ndim != 4 or low_res.shape[1] * self.factor != size or low_res.shape[2] * self.factor != size:
            raise ValueError(
                f"diffusion_upsampler: the low-resolution image {tuple(low_res.shape)} is not 1/{self.factor} of "
                f"the sample's side {size}")
        return degrade.upsample(low_res.astype(jnp.float32), size)

    def denoise(self, x_t: jax.Array, t: jax.Array, low_res: jax.Array, level: jax.Array | None = None,
                train: bool = False) -> jax.Array:
        """The UNet's output (eps, x0 or v, as the task trains it) [B, S, S, 3] at x_t [B, S, S, 3],
        t int [B], given low_res [B, S/f, S/f, 3] and, for a UNet that reads it, the conditioning's
        noise level [B] in [0, 1] (None: 0)."""
        cond = self.condition_input(low_res, x_t.shape[1])
        pooled = None
        if self.reads_level:
            level = jnp.zeros((x_t.shape[0],), jnp.float32) if level is None else jnp.asarray(level, jnp.float32)
            pooled = timestep_embedding(level * LEVEL_SCALE, self.unet.pooled_dim)
        return self.unet(jnp.concatenate([x_t, cond.astype(x_t.dtype)], axis=-1), t, None, pooled=pooled, train=train)

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> jax.Array:
        """images [B, S, S, 3], tokens [B, L] -> the denoiser's output [B, S, S, 3] at t = 0, with
        the base model run on images / factor (so that its params exist too)."""
        low = degrade.downsample(images, self.factor, "area")
        if self.base is not None:
            self.base(low, tokens, train=False)
        t = jnp.zeros((images.shape[0],), jnp.int32)
        return self.denoise(images, t, low, train=train)


def from_config(cfg: ml_collections.ConfigDict) -> DiffusionUpsampler:
    """The model of a `diffusion_upsampler` section: unet (a models.unet section: in_channels 6,
    out_channels 3, no cross-attention), factor (2), base (the previous stage's model section, or
    absent / empty for none)."""
    if not cfg.get("unet"):
        raise ValueError("diffusion_upsampler: model.unet is missing")
    unet = unet_lib.from_config(cfg.unet)
    if unet.in_channels != 6 or unet.out_channels != 3:
        raise ValueError(
            "diffusion_upsampler: the UNet reads [x_t; the upsampled low-resolution image] and predicts 3 "
            f"channels: set model.unet.in_channels 6 and out_channels 3 (got {unet.in_channels}, {unet.out_channels})")
    if unet.cross_attends:
        raise ValueError("diffusion_upsampler: the upsampler takes no caption: use a UNet without cross-attention "
                         "(DownBlock2D / UpBlock2D, mid_block_type 'UNetMidBlock2D' or '')")
    factor = int(cfg.get("factor", 2))
    if factor < 1:
        raise ValueError(f"diffusion_upsampler: factor must be >= 1, got {factor}")
    base = cfg.get("base")
    return DiffusionUpsampler(base=models.build(base) if base else None, unet=unet, factor=factor)
