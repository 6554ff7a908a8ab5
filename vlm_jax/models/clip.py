"""CLIP (Radford et al. 2021) and SigLIP-style variants: an image tower and a text tower projected
into a joint space, L2-normalised, with a learned log temperature (and a bias for the sigmoid loss).
The losses live in tasks/contrastive.py; this module returns embeddings and the logit scale/bias.

Param tree: image/... (ViT, ModifiedResNet or SmallCNN), image_projection/kernel (ViT towers only:
the convolutional towers project inside), text/... (TextTransformer), text_projection/kernel,
logit_scale [], logit_bias [] (loss == "sigmoid" only).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers.linear import dense
from vlm_jax.models import resnet, text, vit

IMAGE_KINDS = ("vit", "resnet", "cnn")
LOSSES = ("softmax", "sigmoid")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x [..., E] -> float32 [..., E] with unit L2 norm along the last axis."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


def frozen_text_embedding(tower: nn.Module, projection: nn.Module, tokens: jax.Array) -> jax.Array:
    """A frozen CLIP text tower as a generator's condition: tokens int [B, L] -> the CLIP text
    embedding [B, E] (tower's pooled output, projected, L2-normalised) scaled to norm sqrt(E), with
    no gradient. (At unit norm its entries, about 1/sqrt(E), would reach a generator's N(0, 0.02)
    dense layers some 30x weaker than a unit-variance input beside them.) The GAN and DALL-E's
    text condition read their CLIP stage's tower through this."""
    unit = l2_normalize(projection(tower(tokens)["pooled"]))
    return jax.lax.stop_gradient(unit * jnp.sqrt(jnp.float32(unit.shape[-1])))


class CLIP(nn.Module):
    """(images [B, H, W, C], tokens int [B, L]) -> unit embeddings [B, E] + logit scale/bias."""

    image: nn.Module
    text: nn.Module
    embed_dim: int = 512
    image_kind: str = "vit"
    loss: str = "softmax"
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    logit_bias_init: float = -10.0
    dtype: Any = jnp.float32

    def setup(self) -> None:
        if self.image_kind not in IMAGE_KINDS:
            raise ValueError(f"CLIP image kind {self.image_kind!r}: choose one of {IMAGE_KINDS}")
        if self.loss not in LOSSES:
            raise ValueError(f"CLIP loss {self.loss!r}: choose one of {LOSSES}")
        if self.image_kind == "vit":
            self.image_projection = dense(
                self.embed_dim,
                ("embed", "mlp"),
                dtype=self.dtype,
                use_bias=False,
                kernel_init=nn.initializers.normal(self.image.width**-0.5),
            )
        self.text_projection = dense(
            self.embed_dim,
            ("embed", "mlp"),
            dtype=self.dtype,
            use_bias=False,
            kernel_init=nn.initializers.normal(self.text.width**-0.5),
        )
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(self.logit_scale_init), ()),
            (),
            jnp.float32,
        )
        if self.loss == "sigmoid":
            self.logit_bias = self.param(
                "logit_bias",
                nn.with_logical_partitioning(nn.initializers.constant(self.logit_bias_init), ()),
                (),
                jnp.float32,
            )

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images [B, H, W, C] -> projected, unnormalised float32 features [B, E]."""
        if self.image_kind == "vit":
            pooled = self.image.encode(images, train=train)["pooled"]
            return self.image_projection(pooled).astype(jnp.float32)
        return self.image(images, train=train).astype(jnp.float32)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens int [B, L] -> projected, unnormalised float32 features [B, E] (first eos)."""
        return self.text_projection(self.text(tokens)["pooled"]).astype(jnp.float32)

    def __call__(
        self, images: jax.Array, tokens: jax.Array, train: bool = False
    ) -> dict[str, jax.Array]:
        """-> image_embeds, text_embeds [B, E] (unit norm, f32), logit_scale [], logit_bias []."""
        # Split over the batch only: the loss's [B, B] similarities then contract a whole feature
        # axis on each device (with the features split over `tensor`, XLA summed partial
        # similarity matrices across devices: gigabytes per step at CLIP's batch of 32k).
        image_embeds = nn.with_logical_constraint(l2_normalize(self.encode_image(images, train=train)), ("batch", None))
        text_embeds = nn.with_logical_constraint(l2_normalize(self.encode_text(tokens)), ("batch", None))
        # Clipped so the temperature cannot run away (CLIP clamps it at 100).
        logit_scale = jnp.exp(jnp.minimum(self.logit_scale, self.logit_scale_max))
        logit_bias = self.logit_bias if self.loss == "sigmoid" else jnp.zeros((), jnp.float32)
        return dict(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logit_scale=logit_scale,
            logit_bias=logit_bias,
        )


def from_config(cfg: ml_collections.ConfigDict) -> CLIP:
    """CLIP from the model section of configs/clip.py (model.image, model.text and the top keys)."""
    common = dict(
        dtype=cfg.get("dtype", "float32"),
        scan_layers=cfg.get("scan_layers", False),
        remat=cfg.get("remat", "none"),
    )
    kind = cfg.image.get("kind", "vit")
    if kind == "vit":
        # The CLIP recipe's projection replaces a classifier head; pooling feeds it directly.
        image = vit.from_config(cfg.image, num_classes=0, representation_size=0, **common)
    elif kind in ("resnet", "cnn"):
        image = resnet.from_config(cfg.image, output_dim=cfg.embed_dim, dtype=common["dtype"])
    else:
        raise ValueError(f"model.image.kind {kind!r}: choose one of {IMAGE_KINDS}")
    return CLIP(
        image=image,
        text=text.tower_from_config(cfg.text, **common),
        embed_dim=cfg.embed_dim,
        image_kind=kind,
        loss=cfg.get("loss", "softmax"),
        logit_scale_init=cfg.get("logit_scale_init", math.log(1 / 0.07)),
        logit_scale_max=cfg.get("logit_scale_max", math.log(100.0)),
        logit_bias_init=cfg.get("logit_bias_init", -10.0),
        dtype=jnp.dtype(cfg.get("dtype", "float32")),
    )
