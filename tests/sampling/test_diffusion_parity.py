"""Parity with diffusers (optional: skipped without it). For each schedule (linear, scaled_linear,
squaredcos_cap_v2) and prediction type (epsilon, sample, v_prediction): the betas and alphas_cumprod
equal DDPMScheduler's / DDIMScheduler's, the timesteps equal set_timesteps' (leading, trailing,
linspace), and for random model outputs and the same noise, ddpm_step equals DDPMScheduler.step
(each variance type, with and without clipping, the full chain and after set_timesteps) and
ddim_step equals DDIMScheduler.step (eta 0 and > 0 with the noise as `variance_noise`,
set_alpha_to_one on and off), at the first step, a middle one and the last (t = 0 / to clean data),
within 1e-6 in float32 (relative to each array's scale: see _close); and a whole deterministic DDIM
loop equals diffusers' loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from vlm_jax.models.diffusion import schedules as S  # noqa: E402
from vlm_jax.sampling import diffusion as D  # noqa: E402

T = 1000
KINDS = {
    "linear": dict(beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": {},
}
PREDICTIONS = ("epsilon", "sample", "v_prediction")
SHAPE = (2, 3, 5, 4)
TOL = dict(rtol=1e-6, atol=1e-6)


def _ours(kind):
    return S.make_schedule(kind, T, **KINDS[kind])


def _theirs(cls, kind, **kw):
    return cls(num_train_timesteps=T, beta_schedule=kind, **KINDS[kind], **kw)


def _randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _close(ours, theirs, msg, scale=1.0):
    """Within 1e-6, relative to each element or to `scale`, the size of the terms the step computes
    with. Not bit-exact: torch's float32 sqrt is 1 ulp off the correctly rounded value for about a
    fifth of inputs (jnp.sqrt is exact), and x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) at abar ~
    1e-3 magnifies that ulp to a few 1e-6 in elements where the terms cancel to ~0."""
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), err_msg=msg, rtol=TOL["rtol"],
                               atol=TOL["atol"] * max(1.0, scale))


def _scale(schedule, t, out, x):
    """The size of the terms of the conversion to (x0, eps): (|x_t| + |out|) / min(sqrt(abar), sqrt(1 - abar))."""
    a = float(schedule.alphas_cumprod[t])
    return float((out.abs() + x.abs()).max()) / min(a**0.5, (1 - a) ** 0.5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_schedule_arrays_equal_diffusers(kind):
    ours = _ours(kind)
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        theirs = _theirs(cls, kind)
        _close(ours.betas, theirs.betas, f"{cls.__name__} betas")
        _close(ours.alphas, theirs.alphas, f"{cls.__name__} alphas")
        _close(ours.alphas_cumprod, theirs.alphas_cumprod, f"{cls.__name__} alphas_cumprod")


def test_timesteps_equal_set_timesteps():
    for spacing in D.SPACINGS:
        for offset in ((0, 1) if spacing == "leading" else (0,)):
            for n in (1, 3, 7, 50, 333, 999, 1000):
                if spacing == "leading" and offset and n == T:
                    continue  # diffusers would give timestep 1000, outside the schedule; we raise
                for cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
                    sched = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
                    sched.set_timesteps(n)
                    np.testing.assert_array_equal(
                        D.ddim_timesteps(T, n, spacing, offset), sched.timesteps.numpy(),
                        err_msg=f"{cls.__name__} {spacing} offset={offset} n={n}")


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_ddpm_step_equals_diffusers(kind, prediction):
    ours = _ours(kind)
    for variance in D.VARIANCES:
        for clip in (None, 1.0):
            theirs = _theirs(diffusers.DDPMScheduler, kind, prediction_type=prediction, variance_type=variance,
                             clip_sample=clip is not None, clip_sample_range=clip or 1.0)
            for seed, t in enumerate((T - 1, 500, 1, 0)):
                out, x = _randn(3 * seed), _randn(3 * seed + 1)
                got_prev, got_x0 = theirs.step(out, t, x, generator=torch.Generator().manual_seed(99),
                                               return_dict=False)
                prev, x0 = D.ddpm_step(ours, jnp.asarray(out.numpy()), t, jnp.asarray(x.numpy()),
                                       jnp.asarray(_randn(99).numpy()), prediction, clip, variance)
                msg, scale = f"{kind} {prediction} {variance} clip={clip} t={t}", _scale(ours, t, out, x)
                _close(x0, got_x0, msg + " x0", scale)
                _close(prev, got_prev, msg, scale)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddpm_step_after_set_timesteps_equals_diffusers(prediction):
    kind = "scaled_linear"
    ours = _ours(kind)
    theirs = _theirs(diffusers.DDPMScheduler, kind, prediction_type=prediction, clip_sample=False,
                     timestep_spacing="trailing")
    theirs.set_timesteps(7)
    ts = D.ddim_timesteps(T, 7, "trailing")
    prev_ts = D.prev_timesteps(ts, T, "next")
    for i in (0, 3, 6):
        out, x = _randn(2 * i), _randn(2 * i + 1)
        got_prev, got_x0 = theirs.step(out, int(ts[i]), x, generator=torch.Generator().manual_seed(5),
                                       return_dict=False)
        prev, x0 = D.ddpm_step(ours, jnp.asarray(out.numpy()), int(ts[i]), jnp.asarray(x.numpy()),
                               jnp.asarray(_randn(5).numpy()), prediction, t_prev=int(prev_ts[i]))
        scale = _scale(ours, int(ts[i]), out, x)
        _close(x0, got_x0, f"{prediction} t={ts[i]} x0", scale)
        _close(prev, got_prev, f"{prediction} t={ts[i]}", scale)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_ddim_step_equals_diffusers(kind, prediction):
    ours = _ours(kind)
    for spacing, n in (("leading", 50), ("trailing", 7)):
        for set_one in (True, False):
            for clip in (None, 1.0):
                theirs = _theirs(diffusers.DDIMScheduler, kind, prediction_type=prediction,
                                 clip_sample=clip is not None, clip_sample_range=clip or 1.0,
                                 set_alpha_to_one=set_one, timestep_spacing=spacing)
                theirs.set_timesteps(n)
                ts = D.ddim_timesteps(T, n, spacing)
                prev_ts = D.prev_timesteps(ts, T, "diffusers")
                for i in (0, n // 2, n - 1):
                    t, t_prev = int(ts[i]), int(prev_ts[i])
                    out, x, z = _randn(3 * i), _randn(3 * i + 1), _randn(3 * i + 2)
                    for eta in (0.0, 0.7, 1.0):
                        got_prev, got_x0 = theirs.step(out, t, x, eta=eta, variance_noise=z, return_dict=False)
                        prev, x0 = D.ddim_step(ours, jnp.asarray(out.numpy()), t, t_prev, jnp.asarray(x.numpy()),
                                               eta, jnp.asarray(z.numpy()), prediction, set_one, clip)
                        msg = f"{kind} {prediction} {spacing} n={n} one={set_one} clip={clip} t={t} eta={eta}"
                        _close(x0, got_x0, msg + " x0", _scale(ours, t, out, x))
                        _close(prev, got_prev, msg, _scale(ours, t, out, x))


@pytest.mark.parametrize("spacing,n,offset", [("leading", 20, 1), ("trailing", 7, 0)])
def test_whole_ddim_loop_equals_diffusers(spacing, n, offset):
    kind, prediction = "scaled_linear", "v_prediction"
    ours = _ours(kind)
    theirs = _theirs(diffusers.DDIMScheduler, kind, prediction_type=prediction, clip_sample=False,
                     set_alpha_to_one=False, timestep_spacing=spacing, steps_offset=offset)
    theirs.set_timesteps(n)
    x_T = _randn(0)

    def model(x, t):  # any deterministic function of (x_t, t), the same in both frameworks
        return 0.5 * x - 0.3 * (t.reshape((-1,) + (1,) * (x.ndim - 1)) / T)

    x = x_T
    for t in theirs.timesteps:
        x = theirs.step(model(x, t.repeat(SHAPE[0]).float()), t, x).prev_sample
    ours_x = D.sample_ddim(
        lambda xt, tb: model(xt, tb.astype(jnp.float32)), ours, SHAPE, jax.random.PRNGKey(0), n, 0.0, prediction,
        spacing=spacing, steps_offset=offset, prev_rule="diffusers", set_alpha_to_one=False,
        x_init=jnp.asarray(x_T.numpy()))
    np.testing.assert_allclose(np.asarray(ours_x), x.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dynamic_thresholding_equals_diffusers(prediction):
    """threshold r, threshold_max m <-> thresholding=True, dynamic_thresholding_ratio=r,
    sample_max_value=m, in both steps (the outputs scaled up so that the quantile passes 1)."""
    kind = "linear"
    ours = _ours(kind)
    for ratio, cap in ((0.995, 1.0), (0.9, 3.0), (0.5, 1e9)):
        common = dict(prediction_type=prediction, thresholding=True, dynamic_thresholding_ratio=ratio,
                      sample_max_value=cap)
        ddpm = _theirs(diffusers.DDPMScheduler, kind, **common)
        ddim = _theirs(diffusers.DDIMScheduler, kind, **common)
        ddim.set_timesteps(50)
        ts, prev_ts = D.ddim_timesteps(T, 50, "leading"), D.prev_timesteps(D.ddim_timesteps(T, 50, "leading"), T)
        for i in (0, 25, 49):
            t, t_prev = int(ts[i]), int(prev_ts[i])
            out, x, z = 3 * _randn(4 * i), 3 * _randn(4 * i + 1), _randn(4 * i + 2)
            msg, scale = f"{prediction} r={ratio} max={cap} t={t}", _scale(ours, t, out, x)
            got_prev, got_x0 = ddim.step(out, t, x, eta=1.0, variance_noise=z, return_dict=False)
            prev, x0 = D.ddim_step(ours, jnp.asarray(out.numpy()), t, t_prev, jnp.asarray(x.numpy()), 1.0,
                                   jnp.asarray(z.numpy()), prediction, threshold=ratio, threshold_max=cap)
            _close(x0, got_x0, msg + " ddim x0", scale)
            _close(prev, got_prev, msg + " ddim", scale)
            got_prev, got_x0 = ddpm.step(out, t, x, generator=torch.Generator().manual_seed(7), return_dict=False)
            prev, x0 = D.ddpm_step(ours, jnp.asarray(out.numpy()), t, jnp.asarray(x.numpy()),
                                   jnp.asarray(_randn(7).numpy()), prediction, threshold=ratio, threshold_max=cap)
            _close(x0, got_x0, msg + " ddpm x0", scale)
            _close(prev, got_prev, msg + " ddpm", scale)
