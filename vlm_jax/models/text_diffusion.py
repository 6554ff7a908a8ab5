"""Text-to-image diffusion (DDPM, Ho et al. 2020; latent diffusion, Rombach et al. 2022): a UNet
denoiser (models.unet) conditioned on a frozen CLIP text tower, in pixel space or in the latent
space of a frozen KL autoencoder (models.autoencoder_kl, trained in a stage of its own).

Conditioning, both from the caption's tokens through the CLIP run's text tower (loaded by
train.init_from_map "text:text,text_projection:text_projection" and frozen by optim.trainable):

* context [B, L, W]: the tower's last hidden states, which the UNet's cross-attention reads (what
  Stable Diffusion reads from its CLIP text encoder); with `context_dim` > 0 a trained dense maps
  them to that width first;
* pooled [B, E] (when embed_dim > 0; Stable Diffusion has none): the CLIP text embedding (models.clip.frozen_text_embedding: projected, unit norm
  scaled to sqrt(E)), which the UNet adds to its time embedding (unet.pooled_dim = E), so the
  whole caption's meaning in CLIP's space reaches every block.

The empty caption (every token the pad id) is the unconditional input of classifier-free guidance;
the task drops captions to it during training.

Latent diffusion: `encode` maps images to scale * the autoencoder's posterior mean, `decode` maps
back. The scale makes the diffused latents' variance about 1 (Rombach et al. 2022 rescale by 1 /
the std of the first batch's latents: their code's `scale_by_std`). `latent_scale` > 0 fixes it
(a converted Stable Diffusion: its VAE's 0.18215); `latent_scale` 0 (the default) measures it:
the model keeps it in a non-trainable variable, collection "diffusion_stats" (STATS), entry
"latent_scale", 0 until measured (read as 1 meanwhile); `encode(images, measure=True)` with that
collection mutable sets it to 1 / std of these images' posterior means (over all entries) when
it is still 0 and keeps it afterwards. tasks.diffusion's loss does so on the first training
step; the value is saved with the model state in every checkpoint, so resumes, evaluators and
samplers read it back. Without an
autoencoder the images themselves, data-normalised to about [-1, 1], are diffused; with patch p > 1
each p x p block of pixels is stacked into channels first ([B, S, S, 3] <-> [B, S/p, S/p, 3 p^2],
a fixed rearrangement of the same pixels, so still pixel-space diffusion), which divides the
UNet's cost by about p^2 at the same widths.

Param tree: text/... and text_projection/kernel (frozen CLIP parts; no projection with embed_dim 0), context_in/{kernel, bias}
(with context_dim), unet/..., autoencoder/... (frozen, latent diffusion only); model state
diffusion_stats/latent_scale (a measured scale only).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers.linear import dense
from vlm_jax.models import autoencoder_kl, unet as unet_lib
from vlm_jax.models import text as text_tower
from vlm_jax.models.clip import frozen_text_embedding

STATS = "diffusion_stats"  # the collection of the measured latent scale
_MIN_STD = 1e-6  # a measured std below this is taken as this (no infinite scale)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p block's pixels stacked into channels."""
    if p == 1:
        return x
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"text_diffusion: patch {p} does not divide the image size {h}x{w}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """The inverse of space_to_depth."""
    if p == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c // (p * p))


class TextDiffusion(nn.Module):
    """A text-conditioned denoiser; `__call__(images, tokens)` runs every part once (for init)."""

    unet: nn.Module
    text: nn.Module
    embed_dim: int = 32  # the CLIP run's embedding width (its text_projection's output); 0: no pooled
    context_dim: int = 0  # > 0: a trained dense from the tower's width to this context width
    autoencoder: nn.Module | None = None
    latent_scale: float = 0.0  # latent diffusion: > 0 a fixed scale; 0 measured on the first batch
    patch: int = 1  # pixel space: p x p pixel blocks stacked into channels

    @property
    def measures_latent_scale(self) -> bool:
        """Whether the latent scale is measured (kept in the STATS collection) rather than fixed."""
        return self.autoencoder is not None and not self.latent_scale > 0

    def setup(self) -> None:
        if self.embed_dim > 0:
            self.text_projection = dense(self.embed_dim, ("embed", "mlp"), use_bias=False)
        if self.context_dim > 0:
            self.context_in = dense(self.context_dim, (None, "embed"), name="context_in")
        if self.measures_latent_scale:
            self.measured_scale = self.variable(STATS, "latent_scale", lambda: jnp.zeros((), jnp.float32))

    def scale(self) -> jax.Array:
        """The latent scale in use, float32 []: the fixed one, or the measured one (1 until measured)."""
        if not self.measures_latent_scale:
            return jnp.asarray(self.latent_scale, jnp.float32)
        measured = self.measured_scale.value
        return jnp.where(measured > 0, measured, 1.0)

    def condition(self, tokens: jax.Array) -> dict[str, jax.Array | None]:
        """tokens int [B, L] -> {"context": [B, L, W], "pooled": [B, E] or None (embed_dim 0)}, the
        frozen tower's (no gradient into it)."""
        hidden = jax.lax.stop_gradient(self.text(tokens)["hidden"])
        context = self.context_in(hidden) if self.context_dim > 0 else hidden
        pooled = frozen_text_embedding(self.text, self.text_projection, tokens) if self.embed_dim > 0 else None
        return {"context": context, "pooled": pooled}

    def encode(self, images: jax.Array, measure: bool = False) -> jax.Array:
        """Images [B, S, S, 3] (data-normalised) -> what is diffused: the images, or scaled latents
        [B, S / f, S / f, C] (the posterior mean; no gradient into the frozen autoencoder).
        measure=True (with the STATS collection mutable): a scale still unmeasured becomes
        1 / std of these images' posterior means (over every entry) before it is applied."""
        if self.autoencoder is None:
            return space_to_depth(images, self.patch)
        mean = jax.lax.stop_gradient(self.autoencoder.encode(images)[0])
        if measure and self.measures_latent_scale and self.is_mutable_collection(STATS):
            stored = self.measured_scale.value
            fresh = 1.0 / jnp.maximum(jnp.std(mean), _MIN_STD)
            self.measured_scale.value = jnp.where(stored > 0, stored, fresh).astype(jnp.float32)
        return mean * self.scale()

    def decode(self, x: jax.Array) -> jax.Array:
        """The inverse of `encode`: diffused samples -> images [B, S, S, 3]."""
        if self.autoencoder is None:
            return depth_to_space(x, self.patch)
        return self.autoencoder.decode(x / self.scale())

    def denoise(self, x_t: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array | None,
                train: bool = False) -> jax.Array:
        """The UNet's output (eps, x0 or v, as the task trains it) at x_t [B, h, w, C], t int [B]."""
        return self.unet(x_t, t, context, pooled=pooled, train=train)

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> jax.Array:
        if self.autoencoder is not None:
            self.autoencoder(images)  # its encoder's and decoder's params (what init needs)
        x = self.encode(images)
        t = jnp.zeros((images.shape[0],), jnp.int32)
        return self.denoise(x, t, **self.condition(tokens), train=train)


def from_config(cfg: ml_collections.ConfigDict) -> TextDiffusion:
    """The model of a `text_diffusion` section: unet (a models.unet section), text (a CLIP text
    tower's settings), embed_dim, context_dim, patch, and for latent diffusion autoencoder (a
    models.autoencoder_kl section) and latent_scale (> 0: fixed; 0 or absent: measured)."""
    for key in ("unet", "text"):
        if not cfg.get(key):
            raise ValueError(f"text_diffusion: model.{key} is missing")
    ae = cfg.get("autoencoder")
    return TextDiffusion(
        unet=unet_lib.from_config(cfg.unet),
        text=text_tower.tower_from_config(cfg.text),
        embed_dim=int(cfg.get("embed_dim", 32)),
        context_dim=int(cfg.get("context_dim", 0)),
        autoencoder=autoencoder_kl.from_config(ae) if ae else None,
        latent_scale=float(cfg.get("latent_scale", 0.0) or 0.0),
        patch=int(cfg.get("patch", 1)),
    )
