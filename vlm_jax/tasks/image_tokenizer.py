"""Training an image tokenizer (models.dvae): DALL-E's discrete VAE or the VQ-VAE variant.

    config.task = dict(name="image_tokenizer", recon_loss="mse",
                       temperature_start=1.0, temperature_end=1 / 16, temperature_steps=...,
                       temperature_schedule="cosine", kl_weight_start=0.0, kl_weight_end=6.6,
                       kl_steps=...)

dVAE (Ramesh et al. 2021, appendix A.2): the decoder reads a Gumbel-softmax relaxation of the
encoder's logits whose temperature is annealed from `temperature_start` to `temperature_end` over
the first `temperature_steps` (cosine, or exponential: geometric interpolation), and the loss is

    recon_loss + kl_weight(step) * KL(q(z | x) || uniform over K) / (H * W * 3)

with the KL summed over the grid (the paper's evidence lower bound, both terms normalised per
pixel value) and its weight raised from `kl_weight_start` to `kl_weight_end` over `kl_steps`
(cosine; the paper: 0 -> 6.6 over 5000 updates, temperature 1 -> 1/16 over 150,000).
`usage_weight` > 0 adds usage_weight * (1 - H(batch-mean posterior) / log K), a codebook-usage
term (wav2vec 2.0's diversity loss; not in the paper) against the collapse onto a few codes
that a small dVAE trained briefly shows. With `straight_through=True` the decoder reads the sample's one-hot argmax (the relaxed
sample's gradient flows back), so training decodes hard codes as evaluation does.
`recon_loss` is "mse" (the default: on flat-coloured images it is well scaled against the KL
term and trains fastest at tiny sizes) or "l1" on the normalised pixels; the paper's logit-Laplace
likelihood is not provided.

VQ-VAE: recon_loss + the quantiser's commitment (and, without EMA, codebook) losses; the EMA
codebook statistics come back as model_state (vq_stats).

Metrics: loss, recon_loss, and for the dVAE kl (nats per grid cell), kl_term, temperature and
kl_weight; for the VQ-VAE commitment_loss, codebook_loss, restarted and codes_below_threshold
(EMA usage under vq.dead_code_threshold); for both the batch's codebook perplexity and dead_codes
(codes no grid cell of the batch uses).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.tasks.base import apply_train

RECON_LOSSES = ("mse", "l1")
TEMPERATURE_SCHEDULES = ("cosine", "exponential")


def _fraction(step: Any, steps: int) -> jax.Array:
    """step / steps clipped to [0, 1], float32 (1 at once when steps <= 0)."""
    if steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.clip(jnp.asarray(step, jnp.float32) / float(steps), 0.0, 1.0)


def temperature_schedule(step: Any, start: float, end: float, steps: int, kind: str = "cosine") -> jax.Array:
    """The Gumbel-softmax temperature at `step` (int or int32 array): `start` at 0, `end` from `steps`
    on; "cosine" (half a cosine between them) or "exponential" (start * (end / start) ** fraction).
    Float32 scalar, monotone between the two."""
    frac = _fraction(step, steps)
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    if kind == "exponential":
        if start <= 0 or end <= 0:
            raise ValueError(f"an exponential temperature schedule needs positive ends, got {start} and {end}")
        return start * (end / start) ** frac
    raise ValueError(f"temperature schedule {kind!r}: choose one of {TEMPERATURE_SCHEDULES}")


def kl_weight_schedule(step: Any, start: float, end: float, steps: int) -> jax.Array:
    """The KL weight at `step`: `start` at 0 rising (half a cosine) to `end` at `steps` and after.
    Float32 scalar."""
    frac = _fraction(step, steps)
    return start + (end - start) * 0.5 * (1.0 - jnp.cos(math.pi * frac))


def reconstruction_loss(reconstruction: jax.Array, images: jax.Array, kind: str = "mse") -> jax.Array:
    """Mean over every pixel value of (reconstruction - images)^2 ("mse") or |.| ("l1"); f32 scalar."""
    diff = reconstruction.astype(jnp.float32) - images.astype(jnp.float32)
    if kind == "mse":
        return jnp.mean(jnp.square(diff))
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    raise ValueError(f"reconstruction loss {kind!r}: choose one of {RECON_LOSSES}")


def kl_to_uniform(logits: jax.Array) -> jax.Array:
    """KL(softmax(logits) || uniform over the K codes) per grid cell: logits [..., K] -> f32 [...] (nats)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp) * logp, axis=-1) + math.log(logits.shape[-1])


def usage_loss(logits: jax.Array) -> jax.Array:
    """1 - H(mean softmax(logits)) / log K over every grid cell of the batch: 0 when the batch's
    average posterior spreads evenly over the K codes, 1 when it sits on one. logits [..., K] -> f32."""
    k = logits.shape[-1]
    mean = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, k), axis=0)
    entropy = -jnp.sum(mean * jnp.log(jnp.maximum(mean, 1e-12)))
    return 1.0 - entropy / math.log(k)


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs: images [B, S, S, 3]."""
    return (batch["image"],)


def _cluster_sizes(tree: Any) -> list[jax.Array]:
    """Every 'cluster_size' leaf in a model_state tree (the quantisers' EMA usage)."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if path and getattr(path[-1], "key", None) == "cluster_size":
            found.append(leaf)
    return found


def loss_fn(model: nn.Module, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
            config: ml_collections.ConfigDict, model_state: dict, *, step: Any = 0) -> tuple[jax.Array, dict]:
    """The tokenizer's loss on a batch {'image' [B, S, S, 3]} at train step `step`, and its metrics
    (see the module docstring); model_state carries the VQ-VAE's EMA statistics."""
    task = config.task
    images = batch["image"]
    tau = temperature_schedule(
        step, float(task.get("temperature_start", 1.0)), float(task.get("temperature_end", 1.0 / 16)),
        int(task.get("temperature_steps", 0)), str(task.get("temperature_schedule", "cosine")),
    )
    extra = {"straight_through": True} if task.get("straight_through", False) else {}
    out, model_state = apply_train(model, params, model_state, images, rng=rng, temperature=tau, **extra)
    recon = reconstruction_loss(out["reconstruction"], images, str(task.get("recon_loss", "mse")))
    metrics = {"recon_loss": recon, "perplexity": out["perplexity"], "dead_codes": out["dead_codes"]}
    if "logits" in out:  # dVAE
        weight = kl_weight_schedule(
            step, float(task.get("kl_weight_start", 0.0)), float(task.get("kl_weight_end", 6.6)),
            int(task.get("kl_steps", 0)),
        )
        kl = kl_to_uniform(out["logits"])  # [B, h, w]
        per_value = jnp.mean(jnp.sum(kl, axis=(1, 2))) / math.prod(images.shape[1:])
        kl_term = weight * per_value
        loss = recon + kl_term
        metrics.update(kl=jnp.mean(kl), kl_term=kl_term, temperature=tau, kl_weight=weight)
        usage_weight = float(task.get("usage_weight", 0.0))
        if usage_weight:
            usage = usage_loss(out["logits"])
            loss = loss + usage_weight * usage
            metrics["usage_loss"] = usage
    else:  # VQ-VAE
        loss = recon + out["vq_loss"]
        metrics.update(
            commitment_loss=out["commitment_loss"], codebook_loss=out["codebook_loss"], restarted=out["restarted"]
        )
        threshold = float((config.model.get("vq") or {}).get("dead_code_threshold", 0.0))
        sizes = _cluster_sizes(model_state)
        if sizes:
            below = sum(jnp.sum(s < max(threshold, 1e-3)) for s in sizes)
            metrics["codes_below_threshold"] = jnp.asarray(below, jnp.float32)
    metrics["loss"] = loss
    return loss, {"metrics": metrics, "model_state": model_state}
