"""The samplers of vlm_jax.sampling.diffusion on analytic "models": the exact predictor for data
that is one point x0* (DDIM must land on x0* for every prediction type, DDPM with all its steps
and with fewer) and for Gaussian
data N(mu, s^2) (the samples' mean and spread must be mu and s); DDIM with eta = 0 is
deterministic; classifier-free guidance at w = 1 / w = 0 is the conditional / unconditional model
and `cond_uncond` makes one batched call; each sampler traces model_fn once whatever the step
count, and reuses the compiled loop; the timesteps' closed forms; bad step counts, guidance scales
and eta raise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models.diffusion import schedules as S
from vlm_jax.sampling import diffusion as D

PREDICTIONS = ("epsilon", "sample", "v_prediction")
SHAPE = (3, 4, 4, 2)


def _b(c, x):
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


# Analytic models, module-level and with the schedule and the data passed as (traced) args, so the
# tests share compiled sampling loops.
def point_model(prediction):
    """model(x_t, t, abar [T], x0* [1, ...]): the exact output for data that is always x0*, from
    eps = (x_t - sqrt(abar_t) x0*) / sqrt(1 - abar_t)."""

    def fn(x, t, ac, x0_star):
        a = _b(ac[t], x)
        x0 = jnp.broadcast_to(x0_star, x.shape)
        eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        return {"epsilon": eps, "sample": x0, "v_prediction": a**0.5 * eps - (1 - a) ** 0.5 * x0}[prediction]

    return fn


POINT = {p: point_model(p) for p in PREDICTIONS}


def gaussian_eps(x, t, ac, mu, sd):
    """The exact eps-predictor for data N(mu, sd^2): E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / (a sd^2 + 1 - a)."""
    a = _b(ac[t], x)
    return (1 - a) ** 0.5 * (x - a**0.5 * mu) / (a * sd**2 + 1 - a)


X0_STAR = jnp.linspace(-0.8, 0.9, int(np.prod(SHAPE[1:]))).reshape((1,) + SHAPE[1:])
TARGET = np.broadcast_to(np.asarray(X0_STAR), SHAPE)


def test_ddpm_and_ddim_land_on_a_point_mass():
    rng = jax.random.PRNGKey(0)
    for prediction, kind in (("epsilon", "linear"), ("sample", "cosine"), ("v_prediction", "scaled_linear")):
        s = S.make_schedule(kind, 200, 0.00085, 0.012) if kind == "scaled_linear" else S.make_schedule(kind, 200)
        out = D.sample_ddim(POINT[prediction], s, SHAPE, rng, 10, 0.0, prediction, args=(s.alphas_cumprod, X0_STAR))
        np.testing.assert_allclose(np.asarray(out), TARGET, atol=1e-4, err_msg=prediction)
    args = (s.alphas_cumprod, X0_STAR)
    x0, traj = D.sample_ddpm(POINT["v_prediction"], s, SHAPE, rng, "v_prediction", args=args,
                             return_trajectory=True)
    np.testing.assert_allclose(np.asarray(x0), TARGET, atol=1e-4)
    assert traj.shape == (201,) + SHAPE  # x_T, then after each of the 200 steps
    np.testing.assert_array_equal(np.asarray(traj[-1]), np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(traj[0]), np.asarray(jax.random.normal(jax.random.split(rng)[0], SHAPE)))
    x0 = D.sample_ddpm(POINT["epsilon"], s, SHAPE, rng, num_steps=10, args=args)
    np.testing.assert_allclose(np.asarray(x0), TARGET, atol=1e-4)


def test_gaussian_data_is_reproduced():
    s = S.make_schedule("linear", 1000)
    mu, sd = 0.5, 0.3
    args = (s.alphas_cumprod, jnp.float32(mu), jnp.float32(sd))
    shape = (4000, 1)
    rng = jax.random.PRNGKey(3)
    for name, x in (("ddpm", D.sample_ddpm(gaussian_eps, s, shape, rng, args=args)),
                    ("ddim", D.sample_ddim(gaussian_eps, s, shape, rng, 50, args=args))):
        x = np.asarray(x)
        assert abs(x.mean() - mu) < 0.03 and abs(x.std() - sd) < 0.03, (name, x.mean(), x.std())


def test_ddim_eta0_is_deterministic_given_x_T_and_eta1_is_not():
    s = S.make_schedule("cosine", 100)
    args = (s.alphas_cumprod, jnp.float32(0.0), jnp.float32(0.5))
    x_T = jax.random.normal(jax.random.PRNGKey(7), SHAPE)
    run = lambda seed, eta: np.asarray(D.sample_ddim(  # noqa: E731
        gaussian_eps, s, SHAPE, jax.random.PRNGKey(seed), 20, eta, x_init=x_T, args=args))
    np.testing.assert_array_equal(run(1, 0.0), run(2, 0.0))
    assert np.abs(run(1, 1.0) - run(2, 1.0)).max() > 1e-2
    np.testing.assert_array_equal(run(1, 1.0), run(1, 1.0))


def test_ddim_trajectory_starts_at_x_T_and_ends_at_the_sample():
    s = S.make_schedule("linear", 50)
    rng = jax.random.PRNGKey(4)
    x0, traj = D.sample_ddim(POINT["epsilon"], s, SHAPE, rng, 5, args=(s.alphas_cumprod, X0_STAR),
                             return_trajectory=True)
    assert traj.shape == (6,) + SHAPE
    np.testing.assert_array_equal(np.asarray(traj[-1]), np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(traj[0]), np.asarray(jax.random.normal(jax.random.split(rng)[0], SHAPE)))


def test_guidance_w1_is_conditional_and_w0_unconditional():
    s = S.make_schedule("linear", 100)
    model = POINT["epsilon"]
    pair = lambda x, t, ac, c, u: (model(x, t, ac, c), model(x, t, ac, u))  # noqa: E731
    cond, uncond = X0_STAR, -X0_STAR
    rng = jax.random.PRNGKey(5)
    sample = lambda f, w, *args: np.asarray(D.sample_ddim(  # noqa: E731
        f, s, SHAPE, rng, 10, guidance=w, args=(s.alphas_cumprod,) + args))
    np.testing.assert_allclose(sample(pair, 1.0, cond, uncond), sample(model, None, cond), atol=1e-6)
    np.testing.assert_allclose(sample(pair, 0.0, cond, uncond), sample(model, None, uncond), atol=1e-6)
    np.testing.assert_allclose(sample(pair, 1.0, cond, uncond), TARGET, atol=1e-4)
    x = jax.random.normal(rng, SHAPE)
    t = jnp.full((3,), 40)
    g = D.guided(pair, 3.0)(x, t, s.alphas_cumprod, cond, uncond)
    c, u = model(x, t, s.alphas_cumprod, cond), model(x, t, s.alphas_cumprod, uncond)
    np.testing.assert_allclose(np.asarray(g), np.asarray(u + 3.0 * (c - u)), rtol=1e-5, atol=1e-5)


def test_cond_uncond_makes_one_batched_call():
    calls = []

    def net(x, t, ctx):
        calls.append((x.shape, t.shape, ctx.shape))
        return x * ctx[:, :1, None, None] + t[:, None, None, None]

    pair = D.cond_uncond(net)
    x = jnp.ones((3, 2, 2, 1))
    t = jnp.array([1, 2, 3])
    ctx = jnp.full((3, 4), 2.0)
    null = jnp.zeros((1, 4))  # one learned empty-prompt embedding, broadcast
    c, u = pair(x, t, ctx, null)
    assert calls == [((6, 2, 2, 1), (6,), (6, 4))]
    np.testing.assert_array_equal(np.asarray(c), np.asarray(net(x, t, ctx)))
    np.testing.assert_array_equal(np.asarray(u), np.asarray(net(x, t, jnp.zeros((3, 4)))))
    # through a sampler: the contexts travel as traced args
    s = S.make_schedule("linear", 20)
    out = D.sample_ddim(pair, s, (3, 2, 2, 1), jax.random.PRNGKey(0), 4, guidance=2.0, args=(ctx, null))
    assert out.shape == (3, 2, 2, 1) and np.isfinite(np.asarray(out)).all()


def test_samplers_trace_the_model_once_whatever_the_step_count():
    s = S.make_schedule("linear", 400)
    for sampler, steps in (("ddim", 3), ("ddim", 400), ("ddpm", None)):
        traces = []

        def fn(x, t, traces=traces):
            traces.append(isinstance(x, jax.core.Tracer))
            return 0.1 * x

        def run(rng, fn=fn, sampler=sampler, steps=steps):
            if sampler == "ddpm":
                return D.sample_ddpm(fn, s, SHAPE, rng, num_steps=steps)
            return D.sample_ddim(fn, s, SHAPE, rng, steps)

        run(jax.random.PRNGKey(0))
        assert traces == [True], (sampler, steps)  # one trace inside one jitted loop, not one per step
        run(jax.random.PRNGKey(1))
        assert traces == [True], (sampler, steps)  # the compiled loop is reused for a new rng


def test_guidance_scale_is_not_a_recompile():
    s = S.make_schedule("linear", 50)
    traces = []

    def pair(x, t):
        traces.append(1)
        return 0.1 * x, 0.2 * x

    for w in (1.0, 2.0, 3.5):
        D.sample_ddim(pair, s, SHAPE, jax.random.PRNGKey(0), 10, guidance=w)
    assert len(traces) == 1


def test_ddim_timesteps_closed_forms():
    np.testing.assert_array_equal(D.ddim_timesteps(1000, 50), np.arange(980, -1, -20))
    np.testing.assert_array_equal(D.ddim_timesteps(1000, 50, "leading", 1), np.arange(981, 0, -20))
    np.testing.assert_array_equal(D.ddim_timesteps(1000, 50, "trailing"), np.arange(999, 0, -20))
    np.testing.assert_array_equal(D.ddim_timesteps(1000, 4, "linspace"), [999, 666, 333, 0])
    np.testing.assert_array_equal(D.ddim_timesteps(10, 10), np.arange(9, -1, -1))
    assert D.ddim_timesteps(1000, 1).tolist() == [0] and D.ddim_timesteps(1000, 1, "trailing").tolist() == [999]
    ts = D.ddim_timesteps(1000, 3, "trailing")
    np.testing.assert_array_equal(ts, [999, 666, 332])
    np.testing.assert_array_equal(D.prev_timesteps(ts, 1000), [666, 332, -1])
    np.testing.assert_array_equal(D.prev_timesteps(ts, 1000, "diffusers"), [666, 333, -1])


def test_ddpm_step_adds_noise_only_above_t0_and_takes_a_batch_of_t():
    s = S.make_schedule("linear", 100)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(8), 3)
    out, x, z = (jax.random.normal(k, SHAPE) for k in (k1, k2, k3))
    zero = jnp.zeros_like(z)
    step = jax.jit(lambda t, noise: D.ddpm_step(s, out, t, x, noise))  # t traced: one program per t shape
    at0, x0 = step(0, z)
    np.testing.assert_array_equal(np.asarray(at0), np.asarray(step(0, zero)[0]))
    np.testing.assert_array_equal(np.asarray(at0), np.asarray(x0))  # the last step returns the x0 estimate
    at5 = step(5, z)[0]
    sd = np.asarray(at5 - step(5, zero)[0]) / np.asarray(z)
    a, a_prev = float(s.alphas_cumprod[5]), float(s.alphas_cumprod[4])
    np.testing.assert_allclose(sd, ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5, rtol=1e-4)
    per_example = step(jnp.array([0, 5, 5]), z)[0]
    np.testing.assert_allclose(np.asarray(per_example[0]), np.asarray(at0[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(per_example[1:]), np.asarray(at5[1:]), rtol=1e-6)


def test_bad_inputs_raise():
    s = S.make_schedule("linear", 100)
    fn = POINT["epsilon"]
    rng = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="at least 1"):
        D.sample_ddim(fn, s, SHAPE, rng, 0)
    with pytest.raises(ValueError, match="at least 1"):
        D.sample_ddpm(fn, s, SHAPE, rng, num_steps=0)
    with pytest.raises(ValueError, match="more than the schedule's 100"):
        D.sample_ddim(fn, s, SHAPE, rng, 101)
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        D.sample_ddim(fn, s, SHAPE, rng, 10, guidance=-1.0)
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        D.sample_ddpm(fn, s, SHAPE, rng, guidance=-0.5)
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        D.guided(lambda x, t: (x, x), -2)
    with pytest.raises(ValueError, match="eta"):
        D.sample_ddim(fn, s, SHAPE, rng, 10, eta=-0.1)
    with pytest.raises(ValueError, match="spacing 'middle'"):
        D.ddim_timesteps(100, 10, "middle")
    with pytest.raises(ValueError, match="leave"):
        D.ddim_timesteps(100, 100, "leading", steps_offset=1)
    with pytest.raises(ValueError, match="unknown prediction type"):
        D.sample_ddpm(fn, s, SHAPE, rng, "noise")
    with pytest.raises(ValueError, match="variance"):
        D.ddpm_step(s, X0_STAR, 3, X0_STAR, X0_STAR, variance="learned")
    with pytest.raises(ValueError, match="needs the noise"):
        D.ddim_step(s, X0_STAR, 3, 2, X0_STAR, eta=0.5)
    with pytest.raises(ValueError, match="x_init has shape"):
        D.sample_ddim(fn, s, SHAPE, rng, 5, x_init=jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="quantile in"):
        D.sample_ddim(fn, s, SHAPE, rng, 5, threshold=1.5)
    with pytest.raises(ValueError, match="threshold_max must be >= 1"):
        D.sample_ddpm(fn, s, SHAPE, rng, threshold=0.9, threshold_max=0.5)


def test_dynamic_threshold_closed_form_and_in_the_loop():
    """threshold_x0: an example whose |x0| quantile is at most 1 is only clipped to [-1, 1]; one above
    is clipped to [-s, s] and divided by s (s capped at threshold_max). In a sampler, an x0* inside
    [-1, 1] is still reached (the threshold never exceeds 1 near the end), one outside is pulled in."""
    x0 = jnp.stack([jnp.array([0.2, -0.5, 1.4, 0.9]), jnp.array([4.0, -2.0, 1.0, 0.5])]).reshape(2, 2, 2, 1)
    got = np.asarray(D.threshold_x0(x0, 0.5)).reshape(2, 4)
    np.testing.assert_allclose(got[0], [0.2, -0.5, 1.0, 0.9])  # median |x0| 0.7 -> s = 1
    s = 1.5  # the median of |[4, -2, 1, 0.5]|, linear interpolation
    np.testing.assert_allclose(got[1], np.clip([4.0, -2.0, 1.0, 0.5], -s, s) / s, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(D.threshold_x0(x0, 0.5, 1.2)).reshape(2, 4)[1],
                               np.clip([4.0, -2.0, 1.0, 0.5], -1.2, 1.2) / 1.2, rtol=1e-6)
    s_ = S.make_schedule("linear", 200)
    rng = jax.random.PRNGKey(0)
    out = D.sample_ddim(POINT["epsilon"], s_, SHAPE, rng, 10, args=(s_.alphas_cumprod, X0_STAR), threshold=0.9)
    np.testing.assert_allclose(np.asarray(out), TARGET, atol=1e-4)
    far = 3.0 * X0_STAR
    out = D.sample_ddim(POINT["epsilon"], s_, SHAPE, rng, 10, args=(s_.alphas_cumprod, far), threshold=0.9)
    assert float(jnp.abs(out).max()) <= 1.0 + 1e-5 < float(jnp.abs(far).max())
