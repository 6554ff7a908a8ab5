"""data.degrade: the resampling, blur, noise and JPEG-like operations, and low_res's random mixes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.data import degrade

_blur = jax.jit(degrade.blur, static_argnums=2)  # one program per shape, not op by op
_jpeg = jax.jit(degrade.jpeg)


def _images(seed: int = 0, shape=(2, 16, 16, 3)) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), shape, jnp.float32, -1.0, 1.0)


def test_resampling_shapes_and_closed_forms():
    x = _images()
    area = np.asarray(degrade.downsample(x, 2, "area"))
    np.testing.assert_allclose(area, np.asarray(x).reshape(2, 8, 2, 8, 2, 3).mean(axis=(2, 4)), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(degrade.downsample(x, 4, "nearest"), np.asarray(x)[:, 2::4, 2::4])
    for method in degrade.DOWN_METHODS:
        assert degrade.downsample(x, 4, method).shape == (2, 4, 4, 3)
    assert degrade.upsample(x, 32).shape == (2, 32, 32, 3)
    const = jnp.full((1, 4, 4, 3), 0.25)
    np.testing.assert_allclose(degrade.upsample(const, 8), 0.25, rtol=1e-6)
    with pytest.raises(ValueError, match="factor 3 does not divide"):
        degrade.downsample(x, 3)
    with pytest.raises(ValueError, match="method 'box'"):
        degrade.downsample(x, 2, "box")


def test_blur_is_a_normalised_gaussian_and_keeps_constants():
    impulse = jnp.zeros((1, 15, 15, 1)).at[0, 7, 7, 0].set(1.0)
    out = np.asarray(_blur(impulse, 1.0, 3))[0, :, :, 0]
    k = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    k /= k.sum()
    np.testing.assert_allclose(out[4:11, 4:11], np.outer(k, k), rtol=1e-5, atol=1e-7)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)
    const = jnp.full((2, 8, 8, 3), -0.3)
    np.testing.assert_allclose(_blur(const, jnp.array([0.5, 2.0]), 6), -0.3, rtol=1e-5)  # edges too
    x = _images()
    np.testing.assert_allclose(_blur(x, 0.0, 2), x, atol=1e-6)  # sigma 0: the identity
    assert np.abs(np.asarray(_blur(x, 1.0, 3)) - np.asarray(x)).max() > 0.1


def test_noise_and_noise_augmentation():
    x = _images()
    key = jax.random.key(5)
    np.testing.assert_array_equal(degrade.noise_augment(x, key, 0.0), x)
    pure = degrade.noise_augment(x, key, 1.0)
    np.testing.assert_allclose(pure, jax.random.normal(key, x.shape), rtol=1e-6)  # level 1: no signal left
    noisy = np.asarray(degrade.add_noise(x, key, jnp.array([0.0, 0.1])))
    np.testing.assert_array_equal(noisy[0], np.asarray(x)[0])
    assert 0.05 < np.std(noisy[1] - np.asarray(x)[1]) < 0.15


def test_jpeg_quantisation_loses_more_at_low_quality():
    x = _blur(_images(shape=(2, 12, 12, 3)), 1.0, 3)  # smooth content, a size not a multiple of 8
    err = lambda q: float(jnp.abs(_jpeg(x, q) - x).mean())  # noqa: E731
    assert err(100.0) < 2 * 2 / 255  # tables of ones: only rounding
    assert err(100.0) < err(50.0) < err(5.0)
    assert _jpeg(x, 10.0).shape == x.shape
    tables = np.asarray(degrade.quant_tables(jnp.array([50.0, 100.0])))
    assert tables[0, 0, 0, 0] == 16 and tables[0, 1, 0, 0] == 17 and (tables[1] == 1).all()


def test_low_res_kinds_shapes_determinism_and_range():
    x = _images(shape=(3, 16, 16, 3))
    settings = degrade.Settings(blur_sigma=(0.5, 1.0), noise_std=(0.05, 0.1), prob=1.0)
    fn = jax.jit(degrade.low_res, static_argnums=(2, 3, 4))
    area = degrade.downsample(x, 2, "area")
    for kind in degrade.KINDS:
        a = fn(x, jax.random.key(1), 2, kind, settings)
        assert a.shape == (3, 8, 8, 3)
        np.testing.assert_array_equal(a, fn(x, jax.random.key(1), 2, kind, settings))  # the key decides
    np.testing.assert_allclose(fn(x, jax.random.key(1), 2, "none", settings), area, atol=1e-6)
    for kind in ("blur", "bsr"):
        a, b = fn(x, jax.random.key(1), 2, kind, settings), fn(x, jax.random.key(2), 2, kind, settings)
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3  # another key, another degradation
        assert np.abs(np.asarray(a) - np.asarray(area)).max() > 0.05  # it does degrade
    bsr = np.asarray(fn(x, jax.random.key(3), 2, "bsr", settings))
    assert np.isfinite(bsr).all() and bsr.min() >= -1.0 and bsr.max() <= 1.0
    with pytest.raises(ValueError, match="unknown degradation 'jpeg'"):
        degrade.low_res(x, jax.random.key(0), 2, "jpeg")
    with pytest.raises(ValueError, match="blur_sigma must be a range"):
        degrade.Settings(blur_sigma=(1.0, 0.5))
