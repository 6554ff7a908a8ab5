"""Text-to-image diffusion training and sampling (models.text_diffusion; DDPM and latent diffusion).

    config.task = dict(name="diffusion", schedule="linear", num_train_steps=1000, beta_start=1e-4,
                       beta_end=0.02, prediction="epsilon", min_snr_gamma=0.0, cond_drop=0.1,
                       sampler="ddim", sample_steps=50, eta=0.0, guidance=3.0, clip_sample=1.0,
                       spacing="leading", steps_offset=0, prev_rule="next", set_alpha_to_one=True,
                       threshold=0.0, threshold_max=0.0)

Loss (Ho et al. 2020, the "simple" objective): x0 = model.encode(images) (pixels, or scaled
latents), t ~ U{0, ..., T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; the
UNet's output at (x_t, t, caption) against `prediction`'s target (eps, x0 or v), mean squared,
weighted per example by min-SNR-gamma when min_snr_gamma > 0 (Hang et al. 2023). cond_drop: the
fraction of captions replaced by the empty caption (every token the pad id; task.null_tokens: the
ids of the empty prompt as the run's tokenizer writes it, see null_tokens) during training, which
classifier-free guidance needs (Ho & Salimans 2022). Metrics: loss, mse (unweighted), and the mse
over the low / high half of the timesteps; for latent diffusion also latent_scale.

Latent diffusion with a measured scale (models.text_diffusion: model.latent_scale 0): the loss
encodes with measure=True and the scale's collection mutable, so the first step sets the scale
to 1 / std of its batch's posterior means (the whole global batch) and every later step keeps it;
the updated model state goes back to the trainer, which checkpoints it (an exact resume reads
the same scale). A first step whose update is not finite keeps the state, so the next one measures.

Drawing (`generate`: the `generation` evaluator and `vlm-jax sample`): from x_T ~ N(0, I), the
reverse chain of vlm_jax.sampling.diffusion as one jitted loop: sampler "ddpm" (ancestral, every
training step, or sample_steps of them when sample_steps > 0) or "ddim" (sample_steps steps, eta),
with guidance w: out_u + w (out_c - out_u) (w = 1: the conditional model alone, no second pass;
w = 0: unconditional), x0 clipped to [-clip_sample, clip_sample] at each step when clip_sample > 0
(pixel space), or, when threshold r > 0, thresholded dynamically (Imagen: divided by the r quantile
of |x0| when that is above 1, capped at threshold_max when > 0; keeps high guidance from
saturating the colours), then model.decode. spacing / steps_offset / prev_rule / set_alpha_to_one
pick the DDIM timesteps as vlm_jax.sampling.diffusion.sample_ddim does (a converted Stable Diffusion
scheduler: prev_rule "diffusers", its own spacing and offset).

Batches: image f32 [B, S, S, 3] (data-normalised to about [-1, 1]), tokens int32 [B, L].
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models.diffusion import schedules
from vlm_jax.models.text_diffusion import STATS
from vlm_jax.sampling import diffusion as samplers
from vlm_jax.tasks.base import apply_train

SAMPLERS = ("ddpm", "ddim")


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs for init: images [B, S, S, 3] and tokens [B, L]."""
    return (batch["image"], batch["tokens"])


def schedule_of(task: ml_collections.ConfigDict) -> schedules.Schedule:
    """The noise schedule that config.task names."""
    return schedules.make_schedule(
        str(task.get("schedule", "linear")), int(task.get("num_train_steps", 1000)),
        float(task.get("beta_start", 1e-4)), float(task.get("beta_end", 0.02)),
    )


def empty_tokens(tokens: jax.Array, pad_id: int = 0) -> jax.Array:
    """The empty caption (guidance's unconditional input) in tokens' shape."""
    return jnp.full_like(tokens, pad_id)


def null_tokens(tokens: jax.Array, task: ml_collections.ConfigDict) -> jax.Array:
    """The unconditional caption in tokens' shape [..., L]: task.null_tokens, the ids of the empty
    prompt as the run's tokenizer writes it (a converted Stable Diffusion: [bos, eos, pad, ...],
    what diffusers encodes for its negative prompt ""; a shorter list is padded with 0), else
    every token the pad id 0 (empty_tokens: the runs trained here)."""
    ids = tuple(int(i) for i in (task.get("null_tokens") or ()))
    if not ids:
        return empty_tokens(tokens)
    length = tokens.shape[-1]
    if len(ids) > length:
        raise ValueError(f"diffusion: task.null_tokens has {len(ids)} ids, the captions {length}")
    row = jnp.zeros((length,), tokens.dtype).at[: len(ids)].set(jnp.asarray(ids, tokens.dtype))
    return jnp.broadcast_to(row, tokens.shape)


def loss_fn(
    model: nn.Module, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
    config: ml_collections.ConfigDict, model_state: dict,
) -> tuple[jax.Array, dict]:
    """The diffusion loss at one random timestep per example (module docstring)."""
    task = config.task
    tokens = batch["tokens"]
    b = tokens.shape[0]
    r_drop = condition_key(rng)
    drop = float(task.get("cond_drop", 0.0))
    if drop > 0:
        dropped = jax.random.bernoulli(r_drop, drop, (b, 1))
        tokens = jnp.where(dropped, null_tokens(tokens, task), tokens)
    variables = {"params": params, **model_state}
    if model.measures_latent_scale:
        x0, stats = model.apply(variables, batch["image"], measure=True, method=model.encode, mutable=[STATS])
        model_state = {**model_state, **stats}
        variables = {"params": params, **model_state}
    else:
        x0 = model.apply(variables, batch["image"], method=model.encode)
    cond = model.apply(variables, tokens, method=model.condition)
    loss, metrics, state = denoising_loss(model, params, model_state, x0, cond, rng, task)
    if model.autoencoder is not None:
        metrics["latent_scale"] = model.apply(variables, method=model.scale)
    return loss, {"metrics": metrics, "model_state": state}


def condition_key(rng: jax.Array) -> jax.Array:
    """The piece of a step's key for dropping conditions; denoising_loss draws from the others."""
    return jax.random.split(rng, 4)[0]


def denoising_loss(
    model: nn.Module, params: Any, model_state: dict, x0: jax.Array, cond: dict, rng: jax.Array,
    task: ml_collections.ConfigDict,
) -> tuple[jax.Array, dict, dict]:
    """The simple loss of any model with text_diffusion's `denoise(x_t, t, context, pooled, train)`
    at clean x0 [B, ...] under condition `cond` ({"context", "pooled"}): one random timestep per
    example, the `task.prediction` target, min-SNR weights -> (loss, metrics, updated model_state).
    Metrics: loss, mse (unweighted) and the mse over the low / high half of the timesteps. rng is
    the step's key: what drops conditions draws from condition_key(rng), this from the rest."""
    schedule = schedule_of(task)
    prediction = str(task.get("prediction", "epsilon"))
    gamma = float(task.get("min_snr_gamma", 0.0)) or None
    r_t, r_noise, r_model = jax.random.split(rng, 4)[1:]
    t, noise, x_t = schedules.training_inputs(schedule, x0, r_t, r_noise)
    out, state = apply_train(model, params, model_state, x_t, t, cond["context"], cond["pooled"], rng=r_model,
                             method=model.denoise)
    loss, metrics = schedules.loss_terms(schedule, out, x0, noise, t, prediction, gamma)
    return loss, metrics, state


@functools.lru_cache(maxsize=None)
def denoiser(model: nn.Module, whole_condition: bool = False):
    """model -> net(x_t, t, cond, variables): one model.denoise call, with cond's "context" and
    "pooled" (text_diffusion's and the unCLIP decoder's signature) or, whole_condition, cond itself
    (the unCLIP prior's). Cached so that the samplers' jitted loop (whose model function is a
    static argument) compiles once per model, not once per call."""

    def net(x_t: jax.Array, t: jax.Array, cond: dict, variables: dict) -> jax.Array:
        if whole_condition:
            return model.apply(variables, x_t, t, cond, method=model.denoise)
        return model.apply(variables, x_t, t, cond["context"], cond["pooled"], method=model.denoise)

    return net


@functools.lru_cache(maxsize=None)
def guided_denoiser(model: nn.Module, whole_condition: bool = False):
    """model -> pair(x_t, t, cond, null, variables) = (out_cond, out_uncond) from one batched call."""
    net = denoiser(model, whole_condition)

    def pair(x_t: jax.Array, t: jax.Array, cond: dict, null: dict, variables: dict):
        both = samplers.cond_uncond(lambda x, tt, c: net(x, tt, c, variables))
        return both(x_t, t, cond, null)

    return pair


@functools.partial(jax.jit, static_argnums=0)
def _condition(model: nn.Module, variables: dict, tokens: jax.Array) -> dict:
    return model.apply(variables, tokens, method=model.condition)


@functools.partial(jax.jit, static_argnums=0)
def _decode(model: nn.Module, variables: dict, x: jax.Array) -> jax.Array:
    return model.apply(variables, x, method=model.decode)


def sample_shape(model: nn.Module, config: ml_collections.ConfigDict, batch: int) -> tuple[int, ...]:
    """The diffused array's shape for `batch` samples: images [B, S/p, S/p, 3 p^2] (model.patch p),
    or the autoencoder's latents [B, S / f, S / f, latent_channels]."""
    size = int(config.data.image_size)
    ae, p = model.autoencoder, model.patch
    if ae is None:
        return (batch, size // p, size // p, 3 * p * p)
    f = 2 ** (len(ae.block_out_channels) - 1)
    return (batch, size // f, size // f, int(ae.latent_channels))


def sample(
    model: nn.Module, variables: dict, tokens: jax.Array, rng: jax.Array, task: ml_collections.ConfigDict, *,
    data_config: ml_collections.ConfigDict, x_init: jax.Array | None = None,
    return_trajectory: bool = False,
) -> Any:
    """Diffused samples (before decode) for tokens [B, L] with the sampler, steps and guidance that
    `task` names (module docstring); with return_trajectory also each step's x."""
    tokens = jnp.asarray(tokens)
    shape = sample_shape(model, ml_collections.ConfigDict({"data": data_config}), tokens.shape[0])
    cond = _condition(model, variables, tokens)
    null = lambda: _condition(model, variables, null_tokens(tokens[:1], task))  # noqa: E731
    return sample_conditioned(model, variables, cond, null, shape, rng, task, x_init=x_init,
                              return_trajectory=return_trajectory)


def sample_conditioned(
    model: nn.Module, variables: dict, cond: dict, null: Callable[[], dict], shape: tuple[int, ...],
    rng: jax.Array, task: ml_collections.ConfigDict, *, x_init: jax.Array | None = None,
    return_trajectory: bool = False,
) -> Any:
    """`sample` for any model with text_diffusion's `denoise(x_t, t, context, pooled)`, given its
    condition `cond` ({"context", "pooled"} for the batch) and `null()`, the unconditional one (one
    row, broadcast; only called when guidance needs it): the sampler, steps and guidance of `task`."""
    w = float(task.get("guidance", 1.0))
    samplers.check_guidance(w)
    if w == 1.0:
        fn, args, guidance = denoiser(model), (cond, variables), None
    else:
        fn, args, guidance = guided_denoiser(model), (cond, null(), variables), w
    return run_sampler(fn, shape, rng, task, guidance=guidance, args=args, x_init=x_init,
                       return_trajectory=return_trajectory, prediction=str(task.get("prediction", "epsilon")),
                       clip_sample=float(task.get("clip_sample", 0.0)) or None)


def run_sampler(
    fn: Callable[..., Any], shape: tuple[int, ...], rng: jax.Array, task: ml_collections.ConfigDict, *,
    prediction: str, clip_sample: float | None, guidance: float | None = None, args: tuple = (),
    x_init: jax.Array | None = None, return_trajectory: bool = False, default_steps: int = 50,
    who: str = "diffusion",
) -> Any:
    """The reverse chain that `task` names, for any denoiser fn(x_t, t, *args) (with guidance w: a
    pair function, vlm_jax.sampling.diffusion's): task.sampler "ddpm" (ancestral; sample_steps of
    the training steps, 0: all) or "ddim" (sample_steps >= 1, eta, spacing, steps_offset, prev_rule,
    set_alpha_to_one), on the schedule of task (schedule_of), one jitted loop; task.threshold r > 0
    thresholds each step's x0 dynamically instead of clipping it (the r quantile of |x0|, at most
    task.threshold_max when > 0: sampling.diffusion.threshold_x0). Every diffusion task
    here (text-to-image, the unCLIP prior and decoder, the upsamplers) draws through this; `who`
    names the task in errors (ValueError for an unknown sampler or a bad step count)."""
    sampler = str(task.get("sampler", "ddim"))
    if sampler not in SAMPLERS:
        raise ValueError(f"{who}: task.sampler {sampler!r}: choose one of {SAMPLERS}")
    steps = int(task.get("sample_steps", default_steps))
    if steps < 0 or (sampler == "ddim" and steps < 1):
        need = "DDIM needs task.sample_steps >= 1" if sampler == "ddim" else "task.sample_steps must be >= 0"
        raise ValueError(f"{who}: {need}, got {steps}")
    threshold = float(task.get("threshold", 0.0)) or None
    common = dict(prediction=prediction, clip_sample=clip_sample, x_init=x_init, return_trajectory=return_trajectory,
                  guidance=guidance, args=args, spacing=str(task.get("spacing", "leading")), threshold=threshold,
                  threshold_max=float(task.get("threshold_max", 0.0)) or float("inf"))
    if sampler == "ddpm":
        return samplers.sample_ddpm(fn, schedule_of(task), shape, rng, num_steps=steps or None, **common)
    return samplers.sample_ddim(
        fn, schedule_of(task), shape, rng, steps, float(task.get("eta", 0.0)),
        steps_offset=int(task.get("steps_offset", 0)), prev_rule=str(task.get("prev_rule", "next")),
        set_alpha_to_one=bool(task.get("set_alpha_to_one", True)), **common)


def generate(model: nn.Module, variables: dict, tokens: jax.Array, rng: jax.Array, config: Any) -> jax.Array:
    """Images [B, S, S, 3] (data-normalised) for tokens [B, L] (module docstring)."""
    x0 = sample(model, variables, tokens, rng, config.task, data_config=config.data)
    return _decode(model, variables, x0)

