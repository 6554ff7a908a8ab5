"""Noise schedules and parameterisations of vlm_jax.models.diffusion.schedules against closed forms:
the betas of each kind, alphas_cumprod as the cumulative product (and the cosine schedule as its
cos^2 formula), q_sample's unit variance, the target <-> (x0, eps) round trip for each prediction
type, the min-SNR weights, the simple loss, and the errors for bad inputs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models.diffusion import schedules as S

PREDICTIONS = ("epsilon", "sample", "v_prediction")


def _np(x):
    return np.asarray(x, np.float64)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_arrays_are_float32_and_consistent(kind):
    s = S.make_schedule(kind, 200)
    assert s.num_train_steps == 200 and s.kind == kind
    for a in (s.betas, s.alphas, s.alphas_cumprod):
        assert a.shape == (200,) and a.dtype == jnp.float32
    np.testing.assert_array_equal(_np(s.alphas), _np(np.float32(1) - np.asarray(s.betas)))
    np.testing.assert_allclose(_np(s.alphas_cumprod), np.cumprod(_np(s.alphas)), rtol=1e-6)
    assert np.all(np.diff(_np(s.alphas_cumprod)) < 0) and 0 < float(s.alphas_cumprod[-1])


def test_linear_betas_endpoints_and_even_spacing():
    s = S.make_schedule("linear", 1000, 1e-4, 0.02)
    b = _np(s.betas)
    np.testing.assert_allclose([b[0], b[-1]], [1e-4, 0.02], rtol=1e-6)
    np.testing.assert_allclose(b, np.linspace(1e-4, 0.02, 1000), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-3)


def test_scaled_linear_is_linear_in_sqrt_space():
    s = S.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    r = np.sqrt(_np(s.betas))
    np.testing.assert_allclose(r, np.linspace(0.00085**0.5, 0.012**0.5, 1000), rtol=1e-6)
    np.testing.assert_allclose([_np(s.betas)[0], _np(s.betas)[-1]], [0.00085, 0.012], rtol=1e-6)


def test_cosine_alphas_cumprod_matches_cos2_formula_before_clipping():
    T = 1000
    s = S.make_schedule("cosine", T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f((i + 1) / T) / f(0) for i in range(T)])
    betas = _np(s.betas)
    clipped = betas >= 0.999 - 1e-7
    assert clipped[-1] and clipped.sum() < 5  # only the last steps hit the cap
    assert betas.max() <= 0.999 + 1e-7
    free = ~np.maximum.accumulate(clipped)  # every step before the first clipped one
    np.testing.assert_allclose(_np(s.alphas_cumprod)[free], expected[free], rtol=1e-5, atol=1e-7)
    alias = S.make_schedule("squaredcos_cap_v2", T)
    np.testing.assert_array_equal(np.asarray(alias.alphas_cumprod), np.asarray(s.alphas_cumprod))


def test_schedule_is_a_pytree_for_jit():
    s = S.make_schedule("linear", 10)
    total = jax.jit(lambda sch: sch.alphas_cumprod.sum())(s)
    np.testing.assert_allclose(float(total), float(np.sum(np.asarray(s.alphas_cumprod))), rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_has_unit_variance_and_broadcasts(kind):
    s = S.make_schedule(kind, 100)
    t = jnp.arange(100)
    ones = jnp.ones((100, 2, 2, 3))
    signal = S.q_sample(s, ones, t, jnp.zeros_like(ones))  # sqrt(abar_t) everywhere
    noise = S.q_sample(s, jnp.zeros_like(ones), t, ones)  # sqrt(1 - abar_t)
    np.testing.assert_allclose(_np(signal) ** 2 + _np(noise) ** 2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(_np(signal)[:, 0, 0, 0] ** 2, _np(s.alphas_cumprod), rtol=1e-6)
    # a scalar t broadcasts over the whole batch; t [B] picks per example
    x0, eps = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 3, 3, 2))
    xt = S.q_sample(s, x0, 7, eps)
    a = float(s.alphas_cumprod[7])
    np.testing.assert_allclose(_np(xt), a**0.5 * _np(x0) + (1 - a) ** 0.5 * _np(eps), rtol=1e-5, atol=1e-6)
    xt_b = S.q_sample(s, x0, jnp.array([7, 7, 50, 50]), eps)
    np.testing.assert_allclose(_np(xt_b[:2]), _np(xt[:2]), rtol=1e-6)
    np.testing.assert_allclose(_np(xt_b[2:]), _np(S.q_sample(s, x0[2:], 50, eps[2:])), rtol=1e-6)


def test_snr_closed_form():
    s = S.make_schedule("linear", 1000)
    a = _np(s.alphas_cumprod)
    np.testing.assert_allclose(_np(S.snr(s, jnp.arange(1000))), a / (1 - a), rtol=1e-4)
    assert np.all(np.diff(_np(S.snr(s, jnp.arange(1000)))) < 0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_target_round_trips_through_to_x0_and_eps(kind, prediction):
    s = S.make_schedule(kind, 1000)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x0 = jax.random.normal(k1, (5, 4, 4, 3))
    eps = jax.random.normal(k2, (5, 4, 4, 3))
    t = jnp.array([0, 10, 500, 900, 998])
    xt = S.q_sample(s, x0, t, eps)
    out = S.target(s, x0, eps, t, prediction)
    x0_hat, eps_hat = S.to_x0_and_eps(s, xt, t, out, prediction)
    np.testing.assert_allclose(_np(x0_hat), _np(x0), atol=2e-3 if kind == "cosine" else 2e-4)
    np.testing.assert_allclose(_np(eps_hat), _np(eps), atol=2e-4)


def test_v_target_closed_form():
    s = S.make_schedule("linear", 50)
    x0, eps = jnp.full((1, 3), 2.0), jnp.full((1, 3), -1.0)
    a = float(s.alphas_cumprod[20])
    v = S.target(s, x0, eps, jnp.array([20]), "v_prediction")
    np.testing.assert_allclose(_np(v), a**0.5 * -1.0 - (1 - a) ** 0.5 * 2.0, rtol=1e-6)
    assert S.target(s, x0, eps, 3, "epsilon") is eps and S.target(s, x0, eps, 3, "sample") is x0


def test_min_snr_weights():
    s = S.make_schedule("linear", 1000)
    t = jnp.arange(0, 1000, 37)
    snr = _np(S.snr(s, t))
    for p in PREDICTIONS:
        np.testing.assert_array_equal(np.asarray(S.loss_weights(s, t, p, None)), 1.0)
        assert S.loss_weights(s, t, p).shape == t.shape
    g = 5.0
    w_eps = _np(S.loss_weights(s, t, "epsilon", g))
    w_x0 = _np(S.loss_weights(s, t, "sample", g))
    w_v = _np(S.loss_weights(s, t, "v_prediction", g))
    np.testing.assert_allclose(w_eps, np.minimum(snr, g) / snr, rtol=1e-5)
    np.testing.assert_allclose(w_x0, np.minimum(snr, g), rtol=1e-5)
    np.testing.assert_allclose(w_v, np.minimum(snr, g) / (snr + 1), rtol=1e-5)
    # the same weighting in x0 units: the eps loss is snr times the x0 loss, the v loss (snr + 1) times
    np.testing.assert_allclose(w_eps * snr, w_x0, rtol=1e-5)
    np.testing.assert_allclose(w_v * (snr + 1), w_x0, rtol=1e-5)
    assert w_eps[0] < 1e-2 and w_eps[-1] == 1.0  # clean steps down-weighted, noisy ones kept
    with pytest.raises(ValueError, match="min_snr_gamma"):
        S.loss_weights(s, t, "epsilon", 0.0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_simple_loss(prediction):
    s = S.make_schedule("cosine", 100)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 3)
    x0, eps = jax.random.normal(k1, (4, 2, 2, 3)), jax.random.normal(k2, (4, 2, 2, 3))
    t = jnp.array([1, 20, 60, 99])
    tgt = S.target(s, x0, eps, t, prediction)
    assert float(S.simple_loss(s, tgt, x0, eps, t, prediction)) == 0.0
    out = tgt + jax.random.normal(k3, tgt.shape)
    per = _np(((out - tgt) ** 2).reshape(4, -1).mean(1))
    np.testing.assert_allclose(float(S.simple_loss(s, out, x0, eps, t, prediction)), per.mean(), rtol=1e-5)
    w = _np(S.loss_weights(s, t, prediction, 5.0))
    np.testing.assert_allclose(float(S.simple_loss(s, out, x0, eps, t, prediction, 5.0)), (w * per).mean(),
                               rtol=1e-5)


def test_bad_inputs_raise_naming_the_problem():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        S.make_schedule("quadratic")
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            S.make_schedule("linear", n)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        S.make_schedule("linear", 10, 0.0, 0.02)
    s = S.make_schedule("linear", 10)
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="unknown prediction type 'score'"):
        S.target(s, x, x, 1, "score")
    with pytest.raises(ValueError, match="unknown prediction type"):
        S.to_x0_and_eps(s, x, 1, x, "eps")
    with pytest.raises(ValueError, match="unknown prediction type"):
        S.loss_weights(s, jnp.array([1]), "x0")
