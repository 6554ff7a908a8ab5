"""Diffusion upsampling (unCLIP's upsamplers, Ramesh et al. 2022; models.diffusion_upsampler):
training on degraded low-resolution copies of the data, and drawing through a base model.

    config.task = dict(name="diffusion_upsample", schedule="linear", num_train_steps=1000,
                       beta_start=1e-4, beta_end=0.02, prediction="epsilon", min_snr_gamma=0.0,
                       degrade="blur", blur_sigma=(0.4, 0.6), noise_std=(0.0, 0.1),
                       jpeg_quality=(30.0, 95.0), degrade_prob=0.5, noise_aug=0.0,
                       noise_aug_sample=0.0, sampler="ddim", sample_steps=50, eta=0.0,
                       clip_sample=1.0, spacing="leading", steps_offset=0, prev_rule="next",
                       set_alpha_to_one=True,
                       base=dict(task=<the base stage's task section, name included>,
                                 image_size=<the base stage's data.image_size>))

Loss: images x0 [B, S, S, 3] at the stage's data.image_size S; low = data.degrade.low_res(x0,
factor, `degrade`) [B, S/f, S/f, 3] ("none", "blur": Gaussian blur of sigma ~ U[blur_sigma]
low-resolution pixels, "bsr": the random blur / resampling / noise / JPEG-like mix, each step with
probability degrade_prob; see data.degrade); with noise_aug g_max > 0 the conditioning is noised
(data.degrade.noise_augment) to a level g ~ U[0, g_max] per example, which the model reads (its
UNet needs pooled_dim > 0). Then the denoising loss of tasks.diffusion (models.diffusion.schedules'
training_inputs and loss_terms: one random timestep per example, the `prediction` target,
min-SNR-gamma weights) on x0 conditioned on low. Metrics: loss, mse, mse_low_t, mse_high_t (as
tasks.diffusion), x0_mse (the model's one-step estimate of x0, clipped to [-clip_sample,
clip_sample], against x0, over all timesteps) and bilinear_mse (a plain bilinear upsample of low
against x0: the trivial baseline; the best estimate from x_t and low, E[x0 | x_t, low], is never
worse than it, so a trained model's x0_mse falls below it, most clearly with v- or
x0-prediction, whose estimates at large t are not divided by sqrt(abar_t) as epsilon's are).

Drawing: `upsample(model, variables, low, rng, task)`: the reverse chain of
vlm_jax.sampling.diffusion from x_T ~ N(0, I) at factor x low's side, conditioned on low (noised to
noise_aug_sample when that is > 0), as one jitted loop (sampler "ddpm" / "ddim", sample_steps, eta,
spacing ... as tasks.diffusion reads them; no guidance: there is no caption), x0 clipped to
[-clip_sample, clip_sample] at every step and at the end. `generate` draws the low-resolution
images with the base model (the base task's own generate, under a view of the config built from
task.base: its task section, its image size and model.base) and upsamples them;
`generate_stages` returns every stage's images, lowest resolution first, so stacked upsamplers
(up2.base = up1, up1.base = a text-to-image model) give [base, up1, up2].

Batches: image f32 [B, S, S, 3] (data-normalised), tokens int32 [B, L] (read only by the base).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax import tasks
from vlm_jax.data import degrade
from vlm_jax.models.diffusion import schedules
from vlm_jax.tasks.base import apply_train
from vlm_jax.tasks.diffusion import run_sampler, schedule_of


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs for init: images [B, S, S, 3] and tokens [B, L]."""
    return (batch["image"], batch["tokens"])


def _pair(value: Any, key: str) -> tuple[float, float]:
    value = tuple(float(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"diffusion_upsample: task.{key} must be a range (low, high), got {value}")
    return value


def degrade_settings(config: ml_collections.ConfigDict) -> degrade.Settings:
    """data.degrade.Settings from config.task's keys, the value range from config.data's mean / std."""
    task = config.task
    mean = np.asarray(config.data.get("mean", (0.5, 0.5, 0.5)), np.float64).reshape(-1)
    std = np.asarray(config.data.get("std", (0.5, 0.5, 0.5)), np.float64).reshape(-1)
    value_range = (tuple((-mean / std).tolist()), tuple(((1 - mean) / std).tolist()))
    return degrade.Settings(
        blur_sigma=_pair(task.get("blur_sigma", (0.4, 0.6)), "blur_sigma"),
        noise_std=_pair(task.get("noise_std", (0.0, 0.1)), "noise_std"),
        jpeg_quality=_pair(task.get("jpeg_quality", (30.0, 95.0)), "jpeg_quality"),
        prob=float(task.get("degrade_prob", 0.5)), value_range=value_range,
    )


def _degrade_kind(task: ml_collections.ConfigDict) -> str:
    kind = str(task.get("degrade", "blur"))
    if kind not in degrade.KINDS:
        raise ValueError(f"diffusion_upsample: task.degrade {kind!r}: choose one of {degrade.KINDS}")
    return kind


def _noise_level(task: ml_collections.ConfigDict, key: str) -> float:
    level = float(task.get(key, 0.0) or 0.0)
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"diffusion_upsample: task.{key} must lie in [0, 1], got {level}")
    return level


def _check_level_input(model: nn.Module, level: float, key: str) -> None:
    if level > 0 and not model.reads_level:
        raise ValueError(f"diffusion_upsample: task.{key} {level} noises the conditioning, but the model "
                         "cannot read the level: set model.unet.pooled_dim (e.g. 32)")


def loss_fn(
    model: nn.Module, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
    config: ml_collections.ConfigDict, model_state: dict,
) -> tuple[jax.Array, dict]:
    """The denoising loss on the high-resolution images conditioned on their degraded low-resolution
    copies (module docstring)."""
    task = config.task
    schedule = schedule_of(task)
    prediction = str(task.get("prediction", "epsilon"))
    gamma = float(task.get("min_snr_gamma", 0.0)) or None
    aug = _noise_level(task, "noise_aug")
    _check_level_input(model, aug, "noise_aug")
    x0 = batch["image"].astype(jnp.float32)
    b, size = x0.shape[0], x0.shape[1]
    r_low, r_level, r_aug, r_t, r_noise, r_model = jax.random.split(rng, 6)
    low = degrade.low_res(x0, r_low, model.factor, _degrade_kind(task), degrade_settings(config))
    cond, level = low, None
    if aug > 0:
        level = jax.random.uniform(r_level, (b,), jnp.float32, 0.0, aug)
        cond = degrade.noise_augment(low, r_aug, level)
    t, noise, x_t = schedules.training_inputs(schedule, x0, r_t, r_noise)
    out, state = apply_train(model, params, model_state, x_t, t, cond, level, rng=r_model, method=model.denoise)
    loss, metrics = schedules.loss_terms(schedule, out, x0, noise, t, prediction, gamma)
    x0_hat = schedules.to_x0_and_eps(schedule, x_t, t, out.astype(jnp.float32), prediction)[0]
    clip = float(task.get("clip_sample", 1.0) or 0.0)
    if clip > 0:
        x0_hat = jnp.clip(x0_hat, -clip, clip)
    metrics["x0_mse"] = jnp.mean(jnp.square(x0_hat - x0))
    metrics["bilinear_mse"] = jnp.mean(jnp.square(degrade.upsample(low, size) - x0))
    return loss, {"metrics": metrics, "model_state": state}


@functools.lru_cache(maxsize=None)
def _net(model: nn.Module):
    """model -> net(x_t, t, low, level, variables): one denoiser call. Cached so that the samplers'
    jitted loop (whose model function is a static argument) compiles once per model."""

    def net(x_t: jax.Array, t: jax.Array, low: jax.Array, level: jax.Array | None, variables: dict) -> jax.Array:
        return model.apply(variables, x_t, t, low, level, method=model.denoise)

    return net


def upsample(model: nn.Module, variables: dict, low: jax.Array, rng: jax.Array,
             task: ml_collections.ConfigDict) -> jax.Array:
    """Low-resolution images [B, s, s, 3] (data-normalised) -> samples [B, f s, f s, 3] with the
    sampler and steps that `task` names (module docstring). ValueError for an unknown sampler, a
    guidance scale other than 1, or DDIM with sample_steps < 1."""
    if float(task.get("guidance", 1.0)) != 1.0:
        raise ValueError("diffusion_upsample: the upsampler takes no caption, so there is nothing to guide: "
                         f"leave task.guidance at 1 (got {task.guidance})")
    level = _noise_level(task, "noise_aug_sample")
    _check_level_input(model, level, "noise_aug_sample")
    low = jnp.asarray(low, jnp.float32)
    if low.ndim != 4 or low.shape[-1] != 3 or low.shape[1] != low.shape[2]:
        raise ValueError(f"diffusion_upsample: low-resolution images must be [B, s, s, 3], got {tuple(low.shape)}")
    b, size = low.shape[0], low.shape[1] * model.factor
    r_aug, r_sample = jax.random.split(rng)
    levels = None
    if model.reads_level:
        levels = jnp.full((b,), level, jnp.float32)
    if level > 0:
        low = degrade.noise_augment(low, r_aug, level)
    clip = float(task.get("clip_sample", 1.0) or 0.0) or None
    x = run_sampler(_net(model), (b, size, size, 3), r_sample, task, prediction=str(task.get("prediction", "epsilon")),
                    clip_sample=clip, args=(low, levels, variables), who="diffusion_upsample")
    return x if clip is None else jnp.clip(x, -clip, clip)


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The view of the run's config that the base model's task reads: a copy with task =
    config.task.base.task, data.image_size = config.task.base.image_size and model =
    config.model.base. ValueError when task.base is missing or incomplete."""
    base = config.task.get("base")
    if not base or not base.get("task") or not base.task.get("name") or not base.get("image_size"):
        raise ValueError(
            "diffusion_upsample: config.task.base must hold the base stage's settings: "
            "dict(task=<its task section, name included>, image_size=<its data.image_size>)")
    view = ml_collections.ConfigDict(config.to_dict())
    view.task = ml_collections.ConfigDict(base.task.to_dict())
    view.data.image_size = int(base.image_size)
    if config.get("model") and config.model.get("base"):
        view.model = ml_collections.ConfigDict(config.model.base.to_dict())
    return view


def base_variables(variables: Mapping) -> dict:
    """The base model's variables: the `base` sub-tree of every collection that has one."""
    return {k: v["base"] for k, v in variables.items() if isinstance(v, Mapping) and "base" in v}


def _raised(name: str, model: nn.Module, variables: dict, rng: jax.Array, config: ml_collections.ConfigDict,
            *args: Any) -> list[jax.Array]:
    """Every stage's images of the base task's `name`(model.base, its variables, *args, rng, its
    config view) (its `<name>_stages` where it has one, e.g. a stacked upsampler), then this
    upsampler's on the last of them: a list, lowest resolution first."""
    if model.base is None:
        raise ValueError("diffusion_upsample: this upsampler has no base model to draw from: "
                         "upsample(model, variables, low, rng, task) takes low-resolution images instead")
    view = base_config(config)
    base_task = tasks.get(str(view.task.name))
    r_base, r_up = jax.random.split(rng)
    base_vars = base_variables(variables)
    staged, single = getattr(base_task, f"{name}_stages", None), getattr(base_task, name, None)
    if staged is not None:
        images = list(staged(model.base, base_vars, *args, r_base, view))
    elif callable(single):
        images = [single(model.base, base_vars, *args, r_base, view)]
    else:
        raise ValueError(f"diffusion_upsample: the base stage's task {view.task.name!r} has no {name}")
    size = int(config.data.image_size)
    if images[-1].shape[1] * model.factor != size:
        raise ValueError(
            f"diffusion_upsample: the base draws {images[-1].shape[1]}x{images[-1].shape[2]} images; x{model.factor} "
            f"is not data.image_size {size}")
    return images + [upsample(model, variables, images[-1], r_up, config.task)]


def generate_stages(model: nn.Module, variables: dict, tokens: jax.Array, rng: jax.Array,
                    config: ml_collections.ConfigDict) -> list[jax.Array]:
    """Every stage's images for tokens [B, L], lowest resolution first: the base model's (its task's
    generate_stages, or generate), then this upsampler's [B, S, S, 3] (S = config.data.image_size)."""
    return _raised("generate", model, variables, rng, config, tokens)


def generate(model: nn.Module, variables: dict, tokens: jax.Array, rng: jax.Array, config: Any) -> jax.Array:
    """Images [B, S, S, 3] (data-normalised) for tokens [B, L]: the last of generate_stages."""
    return generate_stages(model, variables, tokens, rng, config)[-1]


def variations_stages(model: nn.Module, variables: dict, image: Any, num: int, rng: jax.Array,
                      config: ml_collections.ConfigDict) -> list[jax.Array]:
    """The base task's variations of an image (the unCLIP decoder's: its CLIP embedding drawn `num`
    times), raised through every upsampler: one [num, s, s, 3] per stage, lowest first."""
    return _raised("variations", model, variables, rng, config, image, num)


def variations(model: nn.Module, variables: dict, image: Any, num: int, rng: jax.Array, config: Any) -> jax.Array:
    """The last of variations_stages: [num, S, S, 3]."""
    return variations_stages(model, variables, image, num, rng, config)[-1]


def interpolate_images_stages(model: nn.Module, variables: dict, image_a: Any, image_b: Any, fractions: Any,
                              rng: jax.Array, config: ml_collections.ConfigDict) -> list[jax.Array]:
    """The base task's interpolation between two images (the unCLIP decoder's slerp of their CLIP
    embeddings), raised through every upsampler: one [N, s, s, 3] per stage, lowest first."""
    return _raised("interpolate_images", model, variables, rng, config, image_a, image_b, fractions)


def interpolate_images(model: nn.Module, variables: dict, image_a: Any, image_b: Any, fractions: Any,
                       rng: jax.Array, config: Any) -> jax.Array:
    """The last of interpolate_images_stages: [N, S, S, 3]."""
    return interpolate_images_stages(model, variables, image_a, image_b, fractions, rng, config)[-1]


def stage_config(base: ml_collections.ConfigDict, unet: Mapping, *, factor: int = 2,
                 **task: Any) -> ml_collections.ConfigDict:
    """The config of an upsampler stage over the config `base` of a text-to-image run (a stage's
    config, or an upsampler's, to stack): model = dict(name="diffusion_upsampler", base=base.model,
    unet=unet, factor), task = dict(name="diffusion_upsample", base=dict(task=base.task,
    image_size=base.data.image_size), **task), data.image_size = factor x base's,
    optim.trainable "^(?!base/)" and train.init_from_map "base:." (init_from: the base run); no
    stages. The rest is base's (data, tokenizer, optimiser, mesh)."""
    out = ml_collections.ConfigDict(base.to_dict())
    for key in ("stages", "config_spec"):
        if key in out:
            del out[key]
    out.model = ml_collections.ConfigDict(dict(name="diffusion_upsampler", base=base.model.to_dict(),
                                               unet=dict(unet), factor=int(factor)))
    out.task = ml_collections.ConfigDict(dict(name="diffusion_upsample", **task, base=dict(
        task=base.task.to_dict(), image_size=int(base.data.image_size))))
    out.data.image_size = int(base.data.image_size) * int(factor)
    out.optim.trainable = "^(?!base/)"
    out.train.init_from_map = "base:."
    return out
