"""The unCLIP decoder (Ramesh et al. 2022, section 2.1): a diffusion UNet that draws an image from a
CLIP image embedding (and, weakly, the caption), at a low resolution that the upsamplers
(models.diffusion_upsampler) then raise.

It holds the whole prior run (models.unclip_prior, frozen: train.init_from_map "prior:.", trained
in the stage before), whose world CLIP gives both conditions:

* the CLIP image embedding e [B, E] (the prior's embed_image: unit norm scaled to sqrt(E)): in
  training the true image's, in sampling the prior's sample for the caption (or an image's own, for
  variations). It is added to the UNet's time embedding (unet.pooled_dim = E: the "projected into
  the time embedding" of the paper) and projected into `image_tokens` extra context tokens of the
  cross-attention's width ("four extra tokens of context", GLIDE's text sequence beside them);
* the caption's CLIP text hidden states [B, L, W] (the prior's condition), mapped to the context
  width by a trained dense when context_dim > 0.

The context is [the caption's L tokens; the K image tokens], the UNet's cross-attention reads it
all. Guidance's unconditional input is the empty caption with e = 0: the task drops captions (50%)
and zeroes e (10%) independently during training.

Images are diffused in pixel space at data.image_size / downsample: `encode` average-pools the
data-normalised images by `downsample` (the tiny config: the 32x32 world images at 16x16), `decode`
is the identity. CLIP reads the full-resolution image.

Param tree: prior/... (frozen, the prior run whole, CLIP included), image_tokens/{kernel, bias},
context_in/{kernel, bias} (with context_dim), unet/....
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.data import degrade
from vlm_jax.layers.linear import dense
from vlm_jax.models import unclip_prior, unet as unet_lib


class UnclipDecoder(nn.Module):
    """Draws images from CLIP image embeddings; `__call__(images, tokens)` runs every part (for init)."""

    prior: nn.Module
    unet: nn.Module
    image_tokens: int = 4  # extra context tokens projected from the image embedding
    context_dim: int = 0  # > 0: a trained dense from the text tower's width to this context width
    downsample: int = 1  # the decoder's resolution: data.image_size / downsample

    def setup(self) -> None:
        width = self.context_dim or int(self.unet.cross_attention_dim)
        if width <= 0:
            raise ValueError("unclip_decoder: the UNet needs cross-attention (unet.cross_attention_dim > 0)")
        if self.image_tokens < 0:
            raise ValueError(f"unclip_decoder: image_tokens must be >= 0, got {self.image_tokens}")
        if self.image_tokens:
            self.image_to_tokens = dense(self.image_tokens * width, ("embed", "mlp"), name="image_tokens")
        if self.context_dim > 0:
            self.context_in = dense(self.context_dim, (None, "embed"), name="context_in")

    def embed_image(self, images: jax.Array) -> jax.Array:
        """Full-resolution images [B, S, S, 3] -> their CLIP image embeddings [B, E] (frozen)."""
        return self.prior.embed_image(images)

    def condition(self, tokens: jax.Array, image_embed: jax.Array) -> dict[str, jax.Array]:
        """tokens int [B, L] and e [B, E] -> {"context": [B, L + K, D], "pooled": e}."""
        hidden = jax.lax.stop_gradient(self.prior.condition(tokens)["hidden"])
        context = self.context_in(hidden) if self.context_dim > 0 else hidden
        if self.image_tokens:
            b, width = context.shape[0], context.shape[-1]
            extra = self.image_to_tokens(image_embed).reshape(b, self.image_tokens, width)
            context = jnp.concatenate([context, extra.astype(context.dtype)], axis=1)
        return {"context": context, "pooled": image_embed}

    def encode(self, images: jax.Array) -> jax.Array:
        """Data-normalised images [B, S, S, 3] -> what is diffused: [B, S/d, S/d, 3], the mean of
        each d x d block."""
        return degrade.downsample(images, self.downsample, "area")

    def decode(self, x: jax.Array) -> jax.Array:
        """Diffused samples -> images (the identity: pixel space)."""
        return x

    def denoise(self, x_t: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array,
                train: bool = False) -> jax.Array:
        """The UNet's output (eps, x0 or v, as the task trains it) at x_t [B, h, w, 3], t int [B]."""
        return self.unet(x_t, t, context, pooled=pooled, train=train)

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> jax.Array:
        self.prior(images, tokens)  # the prior's params (CLIP included), what init needs
        cond = self.condition(tokens, self.embed_image(images))
        t = jnp.zeros((images.shape[0],), jnp.int32)
        return self.denoise(self.encode(images), t, **cond, train=train)


def from_config(cfg: ml_collections.ConfigDict) -> UnclipDecoder:
    """The model of an `unclip_decoder` section: prior (an unclip_prior model section), unet (a
    models.unet section with cross-attention and pooled_dim = the CLIP embedding width),
    image_tokens, context_dim, downsample."""
    for key in ("prior", "unet"):
        if not cfg.get(key):
            raise ValueError(f"unclip_decoder: model.{key} is missing")
    return UnclipDecoder(
        prior=unclip_prior.from_config(cfg.prior),
        unet=unet_lib.from_config(cfg.unet),
        image_tokens=int(cfg.get("image_tokens", 4)),
        context_dim=int(cfg.get("context_dim", 0)),
        downsample=int(cfg.get("downsample", 1)),
    )
