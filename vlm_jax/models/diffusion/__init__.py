"""Diffusion models (Ho et al. 2020; Song et al. 2021): the forward process and its parameterisations.

`schedules` holds the noise schedules (linear, scaled-linear, cosine), forward noising q(x_t | x_0),
the epsilon / x0 / v prediction targets and their inversion, and the simple loss with optional
min-SNR weighting. The samplers that run the reverse process (DDPM, DDIM, classifier-free
guidance) live in `vlm_jax.sampling.diffusion`.

`blocks` holds the network blocks (ResNet, attention and transformer blocks, down / upsampling)
that the UNet (`vlm_jax.models.unet`) and the KL autoencoder (`vlm_jax.models.autoencoder_kl`) share.
"""

from __future__ import annotations

from vlm_jax.models.diffusion.schedules import (
    PREDICTIONS,
    SCHEDULES,
    Schedule,
    loss_weights,
    make_schedule,
    q_sample,
    simple_loss,
    snr,
    target,
    to_x0_and_eps,
)

__all__ = [
    "PREDICTIONS",
    "SCHEDULES",
    "Schedule",
    "loss_weights",
    "make_schedule",
    "q_sample",
    "simple_loss",
    "snr",
    "target",
    "to_x0_and_eps",
]
