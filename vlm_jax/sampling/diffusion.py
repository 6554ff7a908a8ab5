"""Reverse diffusion: DDPM ancestral steps, DDIM steps, classifier-free guidance and the jitted loops.

With abar the schedule's alphas_cumprod (vlm_jax.models.diffusion.schedules), a step from timestep
t to an earlier t' (t' = t - 1 for the full chain; t' = -1 means "clean data", abar_{-1} = 1) first
turns the model output into a predicted x0 (optionally clipped to [-c, c], or dynamically
thresholded: `threshold_x0`) and eps, then

  DDPM (Ho et al. 2020, eq. 6-7), the posterior q(x_t' | x_t, x0):
      alpha = abar_t / abar_t',  beta = 1 - alpha
      mean  = sqrt(abar_t') beta / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_t') / (1 - abar_t) x_t
      var   = (1 - abar_t') / (1 - abar_t) beta      ("fixed_small", clamped at 1e-20; "fixed_large": beta)
      x_t'  = mean + sqrt(var) z,  z ~ N(0, I), the noise added only when t > 0
  DDIM (Song et al. 2021, eq. 12, 16):
      sigma = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t')
      x_t'  = sqrt(abar_t') x0 + sqrt(1 - abar_t' - sigma^2) eps + sigma z
      (eta = 0: deterministic; eta = 1: DDPM's variance.) For the last step abar_{-1} is 1, or
      abar_0 with set_alpha_to_one=False.

Both equal diffusers' DDPMScheduler.step / DDIMScheduler.step (same expressions in the same
order, float32) for the same model output and the same noise z; `ddim_timesteps` equals
DDIMScheduler.set_timesteps. Guidance (Ho & Salimans 2022) combines a conditional and an
unconditional output as out_u + w (out_c - out_u), w >= 0 (w = 1: the conditional model, w = 0:
the unconditional one); this is linear in the output, so it is the same in eps, x0 or v space.

Samplers run the whole chain as one jitted `lax.scan` over the timesteps, so model_fn is traced
(and compiled) once whatever the step count; a repeated call with the same model_fn, shape and step
count reuses the compiled loop (the guidance scale, rng, model args and eta are traced, not static;
DDIM with eta = 0 compiles its own loop, which draws no noise).

Shapes: x [B, ...] (images NHWC [B, H, W, C]), t an int scalar for the step functions,
model_fn(x_t [B, ...], t int32 [B], *args) -> [B, ...].
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models.diffusion.schedules import Schedule, check_prediction, to_x0_and_eps

ModelFn = Callable[..., jax.Array]
PairFn = Callable[..., tuple[jax.Array, jax.Array]]

SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")
PREV_RULES = ("next", "diffusers")


def _expand(c: jax.Array, like: jax.Array) -> jax.Array:
    """c of t's shape (scalar or [B]) -> broadcastable against like [B, ...]."""
    return c.reshape(c.shape + (1,) * (jnp.ndim(like) - jnp.ndim(c)))


def _abar_prev(schedule: Schedule, t_prev: jax.Array, final: jax.Array | float) -> jax.Array:
    """alphas_cumprod[t_prev], or `final` where t_prev < 0."""
    ac = schedule.alphas_cumprod
    return jnp.where(t_prev >= 0, ac[jnp.maximum(t_prev, 0)], jnp.asarray(final, jnp.float32))


def threshold_x0(x0: jax.Array, ratio: float, max_value: float = float("inf")) -> jax.Array:
    """Dynamic thresholding (Saharia et al. 2022, Imagen): per example, s = the `ratio` quantile of
    |x0| over all its values (linear interpolation), clamped to [1, max_value]; x0 clipped to [-s, s]
    and divided by s. Pixels that guidance pushes past the data range are pulled in with the rest of
    the image instead of saturating. x0 [B, ...] -> [B, ...]; diffusers' _threshold_sample with
    dynamic_thresholding_ratio=ratio, sample_max_value=max_value (any layout: s is per example)."""
    b = x0.shape[0]
    s = jnp.quantile(jnp.abs(x0).reshape(b, -1).astype(jnp.float32), ratio, axis=1)
    s = jnp.clip(s, 1.0, max_value).reshape((b,) + (1,) * (x0.ndim - 1))
    return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)


def _clip(x0: jax.Array, clip_sample: float | None, threshold: float | None = None,
          threshold_max: float = float("inf")) -> jax.Array:
    """x0 thresholded (threshold: the ratio; clip_sample then unused, as diffusers' thresholding),
    else clipped to [-clip_sample, clip_sample], else as it is."""
    if threshold is not None:
        return threshold_x0(x0, threshold, threshold_max)
    return x0 if clip_sample is None else jnp.clip(x0, -clip_sample, clip_sample)


def check_threshold(threshold: float | None, threshold_max: float) -> None:
    """ValueError unless threshold is None or in (0, 1] and threshold_max >= 1."""
    if threshold is not None and not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"the dynamic threshold is a quantile in (0, 1], got {threshold}")
    if not float(threshold_max) >= 1.0:
        raise ValueError(f"threshold_max must be >= 1 (s is clamped to [1, threshold_max]), got {threshold_max}")


def ddpm_step(
    schedule: Schedule,
    model_out: jax.Array,
    t: jax.Array | int,
    x_t: jax.Array,
    noise: jax.Array,
    prediction: str = "epsilon",
    clip_sample: float | None = None,
    variance: str = "fixed_small",
    t_prev: jax.Array | int | None = None,
    threshold: float | None = None,
    threshold_max: float = float("inf"),
) -> tuple[jax.Array, jax.Array]:
    """One ancestral step x_t -> x_{t_prev} (t_prev default t - 1): model_out, x_t, noise [B, ...],
    t (and t_prev) an int scalar or int [B] -> (x_prev [B, ...], predicted x0 [B, ...]). The noise is
    added only where t > 0. Jit-able (t may be traced). diffusers' DDPMScheduler.step with
    clip_sample=c <-> clip_sample=True, clip_sample_range=c; None <-> clip_sample=False; t_prev is
    its previous_timestep (t - 1, or the next entry of the timesteps after set_timesteps);
    threshold=r, threshold_max=m <-> thresholding=True, dynamic_thresholding_ratio=r,
    sample_max_value=m (`threshold_x0`; clip_sample then unused)."""
    check_prediction(prediction)
    if variance not in VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}: expected one of {VARIANCES}")
    t = jnp.asarray(t, jnp.int32)
    t_prev = t - 1 if t_prev is None else jnp.asarray(t_prev, jnp.int32)
    a_t = schedule.alphas_cumprod[t]
    a_prev = _abar_prev(schedule, t_prev, 1.0)
    b_t = 1 - a_t
    b_prev = 1 - a_prev
    alpha = a_t / a_prev
    beta = 1 - alpha

    x0, _ = to_x0_and_eps(schedule, x_t, t, model_out, prediction)
    x0 = _clip(x0, clip_sample, threshold, threshold_max)
    c_x0 = (a_prev**0.5 * beta) / b_t
    c_xt = alpha**0.5 * b_prev / b_t
    mean = _expand(c_x0, x_t) * x0 + _expand(c_xt, x_t) * x_t

    var = jnp.maximum(b_prev / b_t * beta, 1e-20)
    if variance == "fixed_small":
        std = var**0.5
    elif variance == "fixed_small_log":
        std = jnp.exp(0.5 * jnp.log(var))
    else:
        std = beta**0.5
    x_prev = jnp.where(_expand(t > 0, x_t), mean + _expand(std, x_t) * noise, mean)
    return x_prev, x0


def ddim_timesteps(
    num_train_steps: int, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> np.ndarray:
    """int32 [num_inference_steps], descending, as DDIMScheduler.set_timesteps (and DDPMScheduler's):
        leading   arange(n) * (T // n), reversed, + steps_offset
        trailing  round(arange(T, 0, -T / n)) - 1          (steps_offset ignored, as diffusers)
        linspace  round(linspace(0, T - 1, n)), reversed  (steps_offset ignored, as diffusers)
    ValueError for n < 1, n > T, an unknown spacing, or a timestep outside [0, T)."""
    T, n = int(num_train_steps), int(num_inference_steps)
    if n < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {num_inference_steps}")
    if n > T:
        raise ValueError(f"{n} sampling steps is more than the schedule's {T} training timesteps")
    if spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + int(steps_offset)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}: expected one of {SPACINGS}")
    if ts.min() < 0 or ts.max() >= T:
        raise ValueError(
            f"timesteps {ts.min()}..{ts.max()} (spacing {spacing!r}, steps_offset {steps_offset}) leave [0, {T})"
        )
    return ts.astype(np.int32)


def prev_timesteps(timesteps: np.ndarray, num_train_steps: int, rule: str = "next") -> np.ndarray:
    """int32 [n]: the timestep each step of `timesteps` [n] moves to. "next": the following entry,
    -1 after the last; "diffusers": t - T // n, as DDIMScheduler.step computes it (the same as
    "next" for leading spacing, and for trailing when n divides T)."""
    ts = np.asarray(timesteps, np.int64)
    if rule == "next":
        prev = np.concatenate([ts[1:], [-1]])
    elif rule == "diffusers":
        prev = ts - int(num_train_steps) // len(ts)
    else:
        raise ValueError(f"unknown previous-timestep rule {rule!r}: expected one of {PREV_RULES}")
    return np.maximum(prev, -1).astype(np.int32)


def ddim_step(
    schedule: Schedule,
    model_out: jax.Array,
    t: jax.Array | int,
    t_prev: jax.Array | int,
    x_t: jax.Array,
    eta: float | jax.Array = 0.0,
    noise: jax.Array | None = None,
    prediction: str = "epsilon",
    set_alpha_to_one: bool = True,
    clip_sample: float | None = None,
    threshold: float | None = None,
    threshold_max: float = float("inf"),
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step x_t -> x_{t_prev}: model_out, x_t, noise [B, ...], t and t_prev int scalars (or
    int [B]; t_prev < 0: to clean data, abar = 1, or abar_0 with set_alpha_to_one=False) ->
    (x_prev [B, ...], predicted x0 [B, ...]). The noise (diffusers' `variance_noise`) is scaled by
    sigma(eta) and added when eta > 0; noise None is allowed only for eta = 0. clip_sample and the
    dynamic threshold as in `ddpm_step`. Jit-able."""
    check_prediction(prediction)
    if noise is None:
        if not isinstance(eta, jax.core.Tracer) and float(eta) != 0.0:
            raise ValueError(f"ddim_step with eta={eta} > 0 needs the noise to add")
    t = jnp.asarray(t, jnp.int32)
    t_prev = jnp.asarray(t_prev, jnp.int32)
    a_t = schedule.alphas_cumprod[t]
    final = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
    a_prev = _abar_prev(schedule, t_prev, final)
    b_t = 1 - a_t
    b_prev = 1 - a_prev

    x0, eps = to_x0_and_eps(schedule, x_t, t, model_out, prediction)
    x0 = _clip(x0, clip_sample, threshold, threshold_max)
    var = (b_prev / b_t) * (1 - a_t / a_prev)
    eta = jnp.asarray(eta, jnp.float32)
    std = eta * var**0.5
    direction = _expand(jnp.maximum(1 - a_prev - std**2, 0.0) ** 0.5, x_t) * eps
    x_prev = _expand(a_prev**0.5, x_t) * x0 + direction
    if noise is not None:
        x_prev = jnp.where(eta > 0, x_prev + _expand(std, x_t) * noise, x_prev)
    return x_prev, x0


def check_guidance(w: float | jax.Array) -> None:
    """ValueError for a guidance scale below 0 (checked when w is concrete)."""
    if isinstance(w, jax.core.Tracer):
        return
    if not np.all(np.asarray(w) >= 0):
        raise ValueError(f"the guidance scale must be >= 0 (1: no guidance, 0: unconditional), got {w}")


def combine(cond: jax.Array, uncond: jax.Array, w: float | jax.Array) -> jax.Array:
    """Classifier-free guidance: uncond + w (cond - uncond)."""
    return uncond + w * (cond - uncond)


def guided(model_fn: PairFn, w: float | jax.Array) -> ModelFn:
    """A model function from a pair function: model_fn(x_t, t, *args) -> (out_cond, out_uncond) gives
    fn(x_t, t, *args) = out_u + w (out_c - out_u). ValueError for w < 0. `cond_uncond` builds the
    pair function from a network taking a context, with one batched call."""
    check_guidance(w)

    def fn(x_t: jax.Array, t: jax.Array, *args: Any) -> jax.Array:
        cond, uncond = model_fn(x_t, t, *args)
        return combine(cond, uncond, w)

    return fn


def cond_uncond(net_fn: ModelFn) -> PairFn:
    """net_fn(x [N, ...], t [N], context) -> out [N, ...] becomes a pair function
    pair(x_t [B, ...], t [B], context, null_context) -> (out_cond, out_uncond), each [B, ...], from ONE
    call of net_fn on the batch [x_t; x_t] with contexts [context; null_context] concatenated along
    the batch (context and null_context: arrays or pytrees of arrays [B, ...]; a null context with a
    leading 1, e.g. one learned empty-prompt embedding [1, L, D], is broadcast to B)."""

    def pair(x_t: jax.Array, t: jax.Array, context: Any, null_context: Any) -> tuple[jax.Array, jax.Array]:
        b = x_t.shape[0]

        def cat(c: jax.Array, n: jax.Array) -> jax.Array:
            n = jnp.broadcast_to(n, (b,) + tuple(n.shape[1:])).astype(c.dtype)
            return jnp.concatenate([c, n], axis=0)

        ctx = jax.tree_util.tree_map(cat, context, null_context)
        out = net_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0), ctx)
        return out[:b], out[b:]

    return pair


@functools.partial(
    jax.jit,
    static_argnames=("model_fn", "shape", "kind", "prediction", "guide", "noisy", "clip_sample", "variance",
                     "set_alpha_to_one", "trajectory", "threshold", "threshold_max"),
)
def _loop(
    model_fn: Callable[..., Any],
    schedule: Schedule,
    shape: tuple[int, ...],
    rng: jax.Array,
    x_init: jax.Array | None,
    timesteps: jax.Array,
    prev: jax.Array,
    w: jax.Array,
    eta: jax.Array,
    args: tuple[Any, ...],
    *,
    kind: str,
    prediction: str,
    guide: bool,
    noisy: bool,
    clip_sample: float | None,
    variance: str,
    set_alpha_to_one: bool,
    trajectory: bool,
    threshold: float | None,
    threshold_max: float,
) -> tuple[jax.Array, jax.Array | None]:
    """The whole reverse chain over timesteps [n] (to prev [n]) as one lax.scan. noisy=False (DDIM
    with eta = 0) draws no per-step noise (nor compiles its generator)."""
    k_init, k_steps = jax.random.split(rng)
    x = jax.random.normal(k_init, shape, jnp.float32) if x_init is None else x_init.astype(jnp.float32)
    keys = jax.random.split(k_steps, timesteps.shape[0])

    def body(x_t: jax.Array, step: tuple[jax.Array, jax.Array, jax.Array]):
        t, t_prev, key = step
        t_batch = jnp.full((shape[0],), t, jnp.int32)
        out = model_fn(x_t, t_batch, *args)
        if guide:
            out = combine(out[0], out[1], w)
        out = out.astype(jnp.float32)
        noise = jax.random.normal(key, shape, jnp.float32) if noisy else None
        if kind == "ddpm":
            x_prev, _ = ddpm_step(schedule, out, t, x_t, noise, prediction, clip_sample, variance, t_prev,
                                  threshold, threshold_max)
        else:
            x_prev, _ = ddim_step(schedule, out, t, t_prev, x_t, eta, noise, prediction, set_alpha_to_one,
                                  clip_sample, threshold, threshold_max)
        return x_prev, (x_prev if trajectory else None)

    x0, xs = jax.lax.scan(body, x, (timesteps, prev, keys))
    if trajectory:
        xs = jnp.concatenate([x[None], xs], axis=0)
    return x0, xs


def _check_common(shape: tuple[int, ...], prediction: str, guidance: float | None, x_init: jax.Array | None,
                  threshold: float | None, threshold_max: float) -> None:
    check_prediction(prediction)
    check_threshold(threshold, threshold_max)
    if guidance is not None:
        check_guidance(guidance)
    if len(shape) < 1 or any(int(d) < 1 for d in shape):
        raise ValueError(f"sample shape must be [B, ...] with positive sizes, got {shape}")
    if x_init is not None and tuple(x_init.shape) != tuple(shape):
        raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected the sample shape {tuple(shape)}")


def sample_ddpm(
    model_fn: Callable[..., Any],
    schedule: Schedule,
    shape: tuple[int, ...],
    rng: jax.Array,
    prediction: str = "epsilon",
    guidance: float | None = None,
    *,
    args: tuple[Any, ...] = (),
    num_steps: int | None = None,
    spacing: str = "leading",
    clip_sample: float | None = None,
    variance: str = "fixed_small",
    threshold: float | None = None,
    threshold_max: float = float("inf"),
    x_init: jax.Array | None = None,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Ancestral sampling from x_T ~ N(0, I) (or x_init) [shape] through every training timestep
    T-1 .. 0 (num_steps n: the n timesteps of `ddim_timesteps(T, n, spacing)`, each step to the next,
    as DDPMScheduler.set_timesteps) -> x0 [shape], or (x0, trajectory [n + 1, *shape], x_T first).

    model_fn(x_t [B, ...], t int32 [B], *args) -> model output [B, ...]; with `guidance` w, model_fn
    returns (out_cond, out_uncond) (e.g. `cond_uncond(net)`) and they are combined with w. args (a
    tuple of pytrees: params, contexts) are passed through to model_fn as traced inputs. ValueError
    for num_steps 0, w < 0, a threshold outside (0, 1] or an unknown prediction. clip_sample and
    threshold / threshold_max: what each step does to its predicted x0 (`ddpm_step`)."""
    _check_common(shape, prediction, guidance, x_init, threshold, threshold_max)
    T = schedule.num_train_steps
    if num_steps is None:
        ts = np.arange(T - 1, -1, -1, dtype=np.int32)
    else:
        ts = ddim_timesteps(T, num_steps, spacing)
    if variance not in VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}: expected one of {VARIANCES}")
    x0, xs = _loop(
        model_fn, schedule, tuple(int(d) for d in shape), rng, x_init, jnp.asarray(ts),
        jnp.asarray(prev_timesteps(ts, T, "next")), jnp.float32(guidance or 0.0), jnp.float32(0.0),
        tuple(args), kind="ddpm", prediction=prediction, guide=guidance is not None, noisy=True,
        clip_sample=None if clip_sample is None else float(clip_sample), variance=variance,
        set_alpha_to_one=True, trajectory=bool(return_trajectory),
        threshold=None if threshold is None else float(threshold), threshold_max=float(threshold_max),
    )
    return (x0, xs) if return_trajectory else x0


def sample_ddim(
    model_fn: Callable[..., Any],
    schedule: Schedule,
    shape: tuple[int, ...],
    rng: jax.Array,
    num_steps: int,
    eta: float = 0.0,
    prediction: str = "epsilon",
    guidance: float | None = None,
    *,
    args: tuple[Any, ...] = (),
    spacing: str = "leading",
    steps_offset: int = 0,
    prev_rule: str = "next",
    set_alpha_to_one: bool = True,
    clip_sample: float | None = None,
    threshold: float | None = None,
    threshold_max: float = float("inf"),
    x_init: jax.Array | None = None,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """DDIM sampling in num_steps steps over `ddim_timesteps(T, num_steps, spacing, steps_offset)`,
    each to `prev_timesteps(.., prev_rule)` ("diffusers" reproduces DDIMScheduler's t - T // n), from
    x_T ~ N(0, I) (or x_init) [shape] -> x0 [shape], or (x0, trajectory [n + 1, *shape]). eta = 0 is
    deterministic given x_T. model_fn, guidance, args, clip_sample and the threshold as in
    `sample_ddpm`. ValueError for num_steps < 1 or > T, eta < 0, w < 0, a threshold outside (0, 1]
    or an unknown prediction."""
    _check_common(shape, prediction, guidance, x_init, threshold, threshold_max)
    if not float(eta) >= 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    T = schedule.num_train_steps
    ts = ddim_timesteps(T, num_steps, spacing, steps_offset)
    x0, xs = _loop(
        model_fn, schedule, tuple(int(d) for d in shape), rng, x_init, jnp.asarray(ts),
        jnp.asarray(prev_timesteps(ts, T, prev_rule)), jnp.float32(guidance or 0.0), jnp.float32(eta),
        tuple(args), kind="ddim", prediction=prediction, guide=guidance is not None, noisy=float(eta) > 0,
        clip_sample=None if clip_sample is None else float(clip_sample), variance="fixed_small",
        set_alpha_to_one=bool(set_alpha_to_one), trajectory=bool(return_trajectory),
        threshold=None if threshold is None else float(threshold), threshold_max=float(threshold_max),
    )
    return (x0, xs) if return_trajectory else x0
