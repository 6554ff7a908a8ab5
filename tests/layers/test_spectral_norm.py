"""layers.spectral_norm: the power iteration's estimate and the normalised convolution."""

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.layers.spectral_norm import SpectralConv, spectral_normalise


def test_power_iteration_finds_the_largest_singular_value():
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 6))
    u = jnp.ones((6,)) / np.sqrt(6.0)
    for _ in range(100):
        normalised, u, sigma = spectral_normalise(w, u)
    top = np.linalg.svd(np.asarray(w).reshape(-1, 6), compute_uv=False)[0]
    np.testing.assert_allclose(float(sigma), top, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(normalised).reshape(-1, 6), compute_uv=False)[0], 1.0, rtol=1e-5)


def test_conv_uses_the_normalised_kernel_and_only_training_moves_u():
    layer = SpectralConv(5, 3, strides=2, padding=((1, 1), (1, 1)))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4))
    variables = jax.tree_util.tree_map(lambda a: a, layer.init(jax.random.PRNGKey(2), x))
    params = jax.tree_util.tree_map(lambda a: getattr(a, "value", a), variables["params"],
                                    is_leaf=lambda a: hasattr(a, "value"))
    y_eval, state = layer.apply(variables, x, train=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(state["batch_stats"]["u"], variables["batch_stats"]["u"])
    w, _, _ = spectral_normalise(params["kernel"], variables["batch_stats"]["u"])
    expected = jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["bias"]
    np.testing.assert_allclose(y_eval, expected, rtol=1e-5, atol=1e-6)
    assert y_eval.shape == (2, 4, 4, 5)
    _, state = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(state["batch_stats"]["u"], variables["batch_stats"]["u"])
