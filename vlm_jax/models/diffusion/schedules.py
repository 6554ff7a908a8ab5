"""Noise schedules, forward noising and the three output parameterisations of a diffusion model.

The forward process (Ho et al. 2020) noises data x_0 in T steps with variances beta_t:

    q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I),      alpha_t = 1 - beta_t
    q(x_t | x_0)     = N(sqrt(abar_t) x_0, (1 - abar_t) I),    abar_t = prod_{s<=t} alpha_s

so x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with eps ~ N(0, I) (`q_sample`), and the signal to
noise ratio is snr_t = abar_t / (1 - abar_t) (`snr`). Timesteps are 0-based, t in [0, T), as in
diffusers: t = 0 is the first noising step, not clean data.

Schedules (`make_schedule`; beta_t for t = 0 .. T-1):
    "linear"          beta_t = linspace(beta_start, beta_end, T)                 (DDPM: 1e-4 .. 0.02)
    "scaled_linear"   beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2   (Stable Diffusion uses
                      0.00085 .. 0.012; those are the caller's to pass)
    "cosine"          abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2) on s in [0, 1], and
                      beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999)          (Nichol & Dhariwal 2021;
                      diffusers' "squaredcos_cap_v2", also accepted as a name)
The arithmetic follows diffusers/torch (float32 linspace, cumulative product accumulated in float64
and rounded to float32), so the arrays equal diffusers' schedulers' bit for bit.

A network may be trained to output (`target`) any of
    "epsilon"       eps
    "sample"        x_0
    "v_prediction"  v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0   (Salimans & Ho 2022)
and `to_x0_and_eps` inverts each back to (x_0, eps) given x_t. The simple loss is the mean squared
error to the target; min-SNR-gamma (Hang et al. 2023) weights each example's loss by
min(snr_t, gamma) / snr_t expressed in x_0-space units, i.e. per parameterisation
    epsilon: min(snr, gamma) / snr     sample: min(snr, gamma)     v: min(snr, gamma) / (snr + 1)
(`loss_weights`, `simple_loss`; `loss_terms` adds its metrics, `training_inputs` draws t, noise and x_t).

Shapes: arrays of the schedule are float32 [T]; t is an int scalar or int [B]; data x is
[B, ...] (images NHWC [B, H, W, C]) and per-timestep coefficients broadcast over its trailing dims.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
_ALIASES = {"squaredcos_cap_v2": "cosine"}
_COSINE_S = 0.008
_MAX_BETA = 0.999


@flax.struct.dataclass
class Schedule:
    """A discrete noise schedule: betas, alphas = 1 - betas, alphas_cumprod = cumprod(alphas), each
    float32 [num_train_steps]. A pytree (the arrays are leaves; num_train_steps and kind are static),
    so it can be passed into jitted functions."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    num_train_steps: int = flax.struct.field(pytree_node=False)
    kind: str = flax.struct.field(pytree_node=False)


def _torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """float32 [n], equal to torch.linspace(start, end, n, dtype=torch.float32): a float32 step, and
    values start + step * i for the first half, end - step * (n - 1 - i) for the second, each a fused
    multiply-add (exact in float64, rounded once to float32)."""
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s], np.float32)
    step = np.float64((e - s) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    vals = np.where(i < n // 2, np.float64(s) + step * i, np.float64(e) - step * (n - 1 - i))
    return vals.astype(np.float32)


def _cosine_alpha_bar(s: float) -> float:
    return math.cos((s + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2) ** 2


def _cosine_betas(n: int) -> np.ndarray:
    """float32 [n]: beta_t = min(1 - abar((t+1)/n) / abar(t/n), 0.999), computed in float64."""
    betas = [min(1 - _cosine_alpha_bar((i + 1) / n) / _cosine_alpha_bar(i / n), _MAX_BETA) for i in range(n)]
    return np.asarray(betas, np.float64).astype(np.float32)


def make_schedule(kind: str, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """The Schedule of `kind` ("linear", "scaled_linear", "cosine" / "squaredcos_cap_v2") over
    num_steps training steps; beta_start / beta_end are used by the linear kinds only. ValueError for
    an unknown kind, num_steps < 1, or betas outside (0, 1)."""
    name = _ALIASES.get(kind, kind)
    if name not in SCHEDULES:
        raise ValueError(
            f"unknown noise schedule {kind!r}: expected one of {SCHEDULES + tuple(_ALIASES)}"
        )
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    num_steps = int(num_steps)
    if name == "linear":
        betas = _torch_linspace(beta_start, beta_end, num_steps)
    elif name == "scaled_linear":
        if beta_start < 0 or beta_end < 0:
            raise ValueError(f"scaled_linear needs beta_start, beta_end >= 0, got {beta_start}, {beta_end}")
        betas = _torch_linspace(beta_start**0.5, beta_end**0.5, num_steps) ** 2
    else:
        betas = _cosine_betas(num_steps)
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(
            f"{name} schedule with beta_start={beta_start}, beta_end={beta_end}: betas must lie in (0, 1)"
        )
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    return Schedule(
        betas=jnp.asarray(betas), alphas=jnp.asarray(alphas), alphas_cumprod=jnp.asarray(alphas_cumprod),
        num_train_steps=num_steps, kind=name,
    )


def check_prediction(prediction: str) -> None:
    """ValueError unless prediction is one of PREDICTIONS."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}: expected one of {PREDICTIONS}")


def _at(values: jax.Array, t: jax.Array | int, like: jax.Array) -> jax.Array:
    """values[t] shaped to broadcast against `like`: t scalar -> scalar; t [B] -> [B, 1, ..., 1]
    (like.ndim dims)."""
    t = jnp.asarray(t)
    v = values[t]
    return v.reshape(t.shape + (1,) * (jnp.ndim(like) - t.ndim))


def abar(schedule: Schedule, t: jax.Array | int) -> jax.Array:
    """alphas_cumprod[t], float32 of t's shape."""
    return schedule.alphas_cumprod[jnp.asarray(t)]


def snr(schedule: Schedule, t: jax.Array | int) -> jax.Array:
    """Signal-to-noise ratio abar_t / (1 - abar_t), float32 of t's shape."""
    a = abar(schedule, t)
    return a / (1 - a)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array | int, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise: x0, noise [B, ...], t scalar or [B] -> [B, ...]."""
    a = _at(schedule.alphas_cumprod, t, x0)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def target(
    schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array | int, prediction: str
) -> jax.Array:
    """What a network of `prediction` type should output for x_t = q_sample(x0, t, noise):
    noise (epsilon), x0 (sample) or v = sqrt(abar) noise - sqrt(1 - abar) x0; [B, ...]."""
    check_prediction(prediction)
    if prediction == "epsilon":
        return noise
    if prediction == "sample":
        return x0
    a = _at(schedule.alphas_cumprod, t, x0)
    return a**0.5 * noise - (1 - a) ** 0.5 * x0


def to_x0_and_eps(
    schedule: Schedule, x_t: jax.Array, t: jax.Array | int, model_out: jax.Array, prediction: str
) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) implied by a model output at x_t: x_t, model_out [B, ...], t scalar or [B].

        epsilon:  x0 = (x_t - sqrt(1 - abar) out) / sqrt(abar),   eps = out
        sample:   x0 = out,   eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
        v:        x0 = sqrt(abar) x_t - sqrt(1 - abar) out,   eps = sqrt(abar) out + sqrt(1 - abar) x_t
    """
    check_prediction(prediction)
    a = _at(schedule.alphas_cumprod, t, x_t)
    b = 1 - a
    if prediction == "epsilon":
        return (x_t - b**0.5 * model_out) / a**0.5, model_out
    if prediction == "sample":
        return model_out, (x_t - a**0.5 * model_out) / b**0.5
    return a**0.5 * x_t - b**0.5 * model_out, a**0.5 * model_out + b**0.5 * x_t


def loss_weights(
    schedule: Schedule, t: jax.Array | int, prediction: str, min_snr_gamma: float | None = None
) -> jax.Array:
    """Per-example loss weights, float32 of t's shape: ones for the simple loss (gamma None), else
    min-SNR-gamma: epsilon min(1, gamma / snr) (= min(snr, gamma) / snr, and 1 at snr = 0), sample
    min(snr, gamma), v_prediction min(snr, gamma) / (snr + 1). ValueError for gamma <= 0."""
    check_prediction(prediction)
    t = jnp.asarray(t)
    if min_snr_gamma is None:
        return jnp.ones(t.shape, jnp.float32)
    if not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0 (or None for the simple loss), got {min_snr_gamma}")
    s = snr(schedule, t)
    gamma = jnp.float32(min_snr_gamma)
    if prediction == "epsilon":
        return jnp.minimum(1.0, gamma / s)
    if prediction == "sample":
        return jnp.minimum(s, gamma)
    return jnp.minimum(s, gamma) / (s + 1)


def simple_loss(
    schedule: Schedule,
    model_out: jax.Array,
    x0: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    prediction: str,
    min_snr_gamma: float | None = None,
) -> jax.Array:
    """Scalar: mean over the batch of loss_weights[b] * mean over the rest of (model_out - target)^2,
    with model_out, x0, noise [B, ...] (model_out the network's output at q_sample(x0, t, noise)) and
    t int [B]."""
    return loss_terms(schedule, model_out, x0, noise, t, prediction, min_snr_gamma)[0]


def training_inputs(
    schedule: Schedule, x0: jax.Array, rng_t: jax.Array, rng_noise: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What a denoiser trains on at clean x0 [B, ...]: (t int32 [B] ~ U{0, ..., T-1} from rng_t,
    noise [B, ...] ~ N(0, I) float32 from rng_noise, x_t = q_sample(x0, t, noise))."""
    t = jax.random.randint(rng_t, (x0.shape[0],), 0, schedule.num_train_steps)
    noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
    return t, noise, q_sample(schedule, x0, t, noise)


def loss_terms(
    schedule: Schedule,
    model_out: jax.Array,
    x0: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    prediction: str,
    min_snr_gamma: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(simple_loss, metrics) for the same inputs; metrics: loss, mse (the unweighted mean squared
    error to the target), mse_low_t / mse_high_t (that mse over the examples with t below / at or
    above T // 2; 0 when there are none)."""
    err = jnp.square(model_out.astype(jnp.float32) - target(schedule, x0, noise, t, prediction))
    per_example = err.reshape(err.shape[0], -1).mean(axis=1)
    loss = jnp.mean(loss_weights(schedule, t, prediction, min_snr_gamma) * per_example)
    low = jnp.asarray(t) < schedule.num_train_steps // 2
    return loss, dict(
        loss=loss, mse=per_example.mean(),
        mse_low_t=jnp.sum(per_example * low) / jnp.maximum(low.sum(), 1),
        mse_high_t=jnp.sum(per_example * ~low) / jnp.maximum((~low).sum(), 1),
    )
