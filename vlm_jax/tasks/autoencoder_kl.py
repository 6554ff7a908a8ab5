"""Training the first stage of latent diffusion (Rombach et al. 2022): a KL-regularised autoencoder
(models.autoencoder_kl, the paper's "KL-reg" variant).

    config.task = dict(name="autoencoder_kl", recon_loss="mse", kl_weight=1e-4)

Loss, on a batch {'image' [B, S, S, 3]} (data-normalised pixels):

    recon_loss(decode(z), x) + kl_weight * KL(q(z | x) || N(0, I)) / (S * S * 3)

with z = mean + exp(logvar / 2) * eps the reparameterised sample of the posterior (the model's
"dropout" rng stream), `recon_loss` "mse" (the default) or "l1" over every pixel value
(tasks.image_tokenizer.reconstruction_loss), and the KL summed over the latent grid and divided by
the number of pixel values: both terms per pixel value, as the dVAE task normalises its ELBO, so
`kl_weight` has the paper's meaning (its losses are both sums over the image; its KL-reg
autoencoders use 1e-6 next to an L1 + LPIPS reconstruction term). The paper's perceptual (LPIPS)
and patch-GAN terms are not provided: the built-in world's flat-coloured shapes come back sharp
from the pixel loss alone.

Metrics: loss, recon_loss, kl (nats per latent entry, the batch's mean), kl_term (its weighted
share of the loss), latent_std (the std of the batch's posterior means over all entries: the
diffusion stage's measured latent scale is its inverse) and posterior_std (the mean of
exp(logvar / 2): the noise the decoder learns to ignore).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.tasks.base import apply_train
from vlm_jax.tasks.image_tokenizer import reconstruction_loss


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs: images [B, S, S, 3]."""
    return (batch["image"],)


def kl_per_value(kl: jax.Array, image_shape: tuple[int, ...]) -> jax.Array:
    """The batch's mean KL (kl [B], each summed over the latent grid) per pixel value of an image of
    `image_shape` ([S, S, 3]): float32 scalar."""
    return jnp.mean(kl.astype(jnp.float32)) / math.prod(image_shape)


def loss_fn(model: nn.Module, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
            config: ml_collections.ConfigDict, model_state: dict) -> tuple[jax.Array, dict]:
    """The autoencoder's loss on a batch and its metrics (module docstring)."""
    task = config.task
    images = batch["image"]
    out, model_state = apply_train(model, params, model_state, images, rng=rng)
    recon = reconstruction_loss(out["reconstruction"], images, str(task.get("recon_loss", "mse")))
    weight = float(task.get("kl_weight", 1e-4))
    if weight < 0:
        raise ValueError(f"autoencoder_kl: task.kl_weight must be >= 0, got {weight}")
    kl_term = weight * kl_per_value(out["kl"], images.shape[1:])
    loss = recon + kl_term
    mean = out["mean"]
    metrics = dict(
        loss=loss, recon_loss=recon, kl=jnp.mean(out["kl"]) / math.prod(mean.shape[1:]), kl_term=kl_term,
        latent_std=jnp.std(mean), posterior_std=jnp.mean(jnp.exp(0.5 * out["logvar"])),
    )
    return loss, {"metrics": metrics, "model_state": model_state}
