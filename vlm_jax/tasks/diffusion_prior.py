"""Training and sampling the unCLIP diffusion prior (models.unclip_prior; Ramesh et al. 2022).

    config.task = dict(name="diffusion_prior", schedule="cosine", num_train_steps=1000,
                       prediction="sample", min_snr_gamma=0.0, cond_drop=0.1, sampler="ddim",
                       sample_steps=64, eta=0.0, guidance=2.0, best_of=2, clip_sample=0.0)

Loss: x0 = the frozen CLIP's scaled image embedding of the batch's images (model.embed_image,
[B, E], norm sqrt(E)); the caption replaced by the empty caption (every token the pad id) with
probability cond_drop (`drop_captions`), which classifier-free guidance needs; t ~ U{0, ..., T-1},
eps ~ N(0, I), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; the network's output at (x_t, t,
caption) against `prediction`'s target (x0 by default, the paper's; or eps / v), mean squared
(schedules.simple_loss, min-SNR-gamma weights when min_snr_gamma > 0). Metrics: loss, mse
(unweighted), cos (the cosine between the predicted and the true x0, mean over the batch),
mse_low_t / mse_high_t (the mse over the low / high half of the timesteps) and caption_dropped
(the share of empty captions).

Sampling (`sample_embeddings`, scaled embeddings [B, E] like embed_image's): the schedule and the
sampler keys as tasks.diffusion reads them (schedule, num_train_steps, sampler "ddim" | "ddpm",
sample_steps, eta, spacing, steps_offset, prev_rule, set_alpha_to_one, clip_sample), guidance w
with the empty caption as the unconditional input (out_u + w (out_c - out_u); w = 1: no second
pass), one jitted loop of vlm_jax.sampling.diffusion that compiles once per model, shape and step
count; then best of n (the paper's): best_of candidates per caption, drawn in one batch, keep the
one with the largest dot product with the caption's CLIP text embedding (`pick_best`).

Batches: image f32 [B, S, S, 3] (data-normalised), tokens int32 [B, L].
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models.diffusion import schedules
from vlm_jax.sampling import diffusion as samplers
from vlm_jax.tasks.base import apply_train
from vlm_jax.tasks.diffusion import denoiser, empty_tokens, guided_denoiser, run_sampler, schedule_of

DEFAULT_STEPS = 64  # the paper's prior samples with 64 strided steps
DEFAULT_PREDICTION = "sample"  # the paper's: the prior predicts the clean embedding


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs for init: images [B, S, S, 3] and tokens [B, L]."""
    return (batch["image"], batch["tokens"])


def prediction_of(task: ml_collections.ConfigDict) -> str:
    """task.prediction (default "sample"); ValueError when schedules does not know it."""
    prediction = str(task.get("prediction", DEFAULT_PREDICTION))
    schedules.check_prediction(prediction)
    return prediction


def drop_captions(tokens: jax.Array, rng: jax.Array, rate: float, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """tokens int [B, L] -> (tokens with each row replaced by the empty caption with probability
    `rate`, dropped bool [B])."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"diffusion_prior: task.cond_drop must lie in [0, 1], got {rate}")
    dropped = jax.random.bernoulli(rng, rate, (tokens.shape[0],))
    return jnp.where(dropped[:, None], empty_tokens(tokens, pad_id), tokens), dropped


def loss_fn(
    model: nn.Module, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
    config: ml_collections.ConfigDict, model_state: dict,
) -> tuple[jax.Array, dict]:
    """The prior's diffusion loss at one random timestep per example (module docstring). rng is
    split into (caption drop, t, noise, model) in that order."""
    task = config.task
    schedule = schedule_of(task)
    prediction = prediction_of(task)
    gamma = float(task.get("min_snr_gamma", 0.0)) or None
    r_drop, r_t, r_noise, r_model = jax.random.split(rng, 4)
    variables = {"params": params, **model_state}
    x0 = model.apply(variables, batch["image"], method=model.embed_image)
    tokens, dropped = drop_captions(batch["tokens"], r_drop, float(task.get("cond_drop", 0.1)), model.pad_id)
    cond = model.apply(variables, tokens, method=model.condition)
    t, noise, x_t = schedules.training_inputs(schedule, x0, r_t, r_noise)
    out, state = apply_train(model, params, model_state, x_t, t, cond, rng=r_model, method=model.denoise)
    loss, metrics = schedules.loss_terms(schedule, out, x0, noise, t, prediction, gamma)
    x0_hat = schedules.to_x0_and_eps(schedule, x_t, t, out, prediction)[0]
    cos = jnp.sum(x0_hat * x0, -1) / jnp.maximum(jnp.linalg.norm(x0_hat, axis=-1) * jnp.linalg.norm(x0, axis=-1), 1e-12)
    metrics.update(cos=cos.mean(), caption_dropped=dropped.mean())
    return loss, {"metrics": metrics, "model_state": state}


@functools.partial(jax.jit, static_argnums=0)
def _condition(model: nn.Module, variables: dict, tokens: jax.Array) -> dict:
    return model.apply(variables, tokens, method=model.condition)


def sampling_settings(task: ml_collections.ConfigDict) -> dict[str, Any]:
    """The prior's own sampling keys of config.task, checked: guidance, eta, best_of, prediction,
    clip_sample (None for 0). ValueError for an unknown prediction, guidance < 0, eta < 0 or
    best_of < 1; the sampler and its steps are tasks.diffusion.run_sampler's (it checks them)."""
    w = float(task.get("guidance", 1.0))
    samplers.check_guidance(w)
    eta = float(task.get("eta", 0.0))
    if not eta >= 0:
        raise ValueError(f"diffusion_prior: task.eta must be >= 0, got {eta}")
    best_of = int(task.get("best_of", 2))
    if best_of < 1:
        raise ValueError(f"diffusion_prior: task.best_of must be >= 1 (candidates per caption), got {best_of}")
    return dict(guidance=w, eta=eta, best_of=best_of, prediction=prediction_of(task),
                clip_sample=float(task.get("clip_sample", 0.0)) or None)


def _draw(model: nn.Module, variables: dict, tokens: jax.Array, rng: jax.Array, task: ml_collections.ConfigDict,
          num: int) -> tuple[jax.Array, jax.Array]:
    """(candidates [B, num, E], the captions' text embeddings [B, E]) from one sampler call on the
    B * num rows (caption b's candidates are rows b * num .. b * num + num - 1)."""
    s = sampling_settings(task)
    tokens = jnp.asarray(tokens)
    b = tokens.shape[0]
    rows = jnp.repeat(tokens, num, axis=0)
    cond = _condition(model, variables, rows)
    shape = (b * num, int(model.embed_dim))
    if s["guidance"] == 1.0:
        fn, args, guidance = denoiser(model, True), (cond, variables), None
    else:
        null = _condition(model, variables, empty_tokens(tokens[:1], model.pad_id))
        fn, args, guidance = guided_denoiser(model, True), (cond, null, variables), s["guidance"]
    x = run_sampler(fn, shape, rng, task, prediction=s["prediction"], clip_sample=s["clip_sample"],
                    guidance=guidance, args=args, default_steps=DEFAULT_STEPS, who="diffusion_prior")
    text_embed = cond["text_embed"].reshape(b, num, -1)[:, 0]
    return x.reshape(b, num, -1), text_embed


def candidates(model: nn.Module, variables: dict, tokens: jax.Array, rng: jax.Array,
               task: ml_collections.ConfigDict, num: int | None = None) -> jax.Array:
    """`num` (default task.best_of) sampled embeddings per caption: [B, num, E] for tokens [B, L]."""
    num = sampling_settings(task)["best_of"] if num is None else int(num)
    if num < 1:
        raise ValueError(f"diffusion_prior: candidates per caption must be >= 1, got {num}")
    return _draw(model, variables, tokens, rng, task, num)[0]


def pick_best(cands: jax.Array, text_embed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cands [B, N, E], text_embed [B, E] -> (the candidate with the largest dot product with the
    caption's text embedding [B, E], its index int [B]; ties: the earliest)."""
    scores = jnp.einsum("bne,be->bn", cands, text_embed.astype(cands.dtype))
    choice = jnp.argmax(scores, axis=1)
    return jnp.take_along_axis(cands, choice[:, None, None], axis=1)[:, 0], choice


def sample_embeddings(model: nn.Module, variables: dict, tokens: jax.Array, rng: jax.Array,
                      task: ml_collections.ConfigDict) -> jax.Array:
    """Scaled CLIP image embeddings float32 [B, E] (like embed_image's) for captions tokens [B, L]:
    task.best_of candidates each, the best by text similarity (module docstring). variables: the
    prior's {"params": ..., **model_state}; task: its config.task."""
    cands, text_embed = _draw(model, variables, tokens, rng, task, sampling_settings(task)["best_of"])
    return pick_best(cands, text_embed)[0]
