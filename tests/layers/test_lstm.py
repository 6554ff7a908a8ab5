"""layers.lstm.LSTMCell: PyTorch's nn.LSTMCell with the same weights (float32), and its init."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.layers.lstm import LSTMCell


def test_matches_torch_lstm_cell_over_steps():
    torch = pytest.importorskip("torch")
    b, d, h, steps = 3, 5, 7, 4
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(steps, b, d)).astype(np.float32)
    c0, h0 = rng.normal(size=(2, b, h)).astype(np.float32)
    cell = LSTMCell(h)
    params = nn.unbox(cell.init(jax.random.key(0), (jnp.asarray(c0), jnp.asarray(h0)), jnp.asarray(xs[0])))["params"]
    # Random weights and biases everywhere (not the init's forget bias alone).
    params = {k: jnp.asarray(rng.normal(size=v.shape).astype(np.float32) * 0.5) for k, v in params.items()}
    ref = torch.nn.LSTMCell(d, h)
    with torch.no_grad():
        ref.weight_ih.copy_(torch.from_numpy(np.asarray(params["input_kernel"]).T))
        ref.weight_hh.copy_(torch.from_numpy(np.asarray(params["hidden_kernel"]).T))
        ref.bias_ih.copy_(torch.from_numpy(np.asarray(params["bias"])))
        ref.bias_hh.zero_()
    carry, (th, tc) = (jnp.asarray(c0), jnp.asarray(h0)), (torch.from_numpy(h0), torch.from_numpy(c0))
    for x in xs:
        carry, out = cell.apply({"params": params}, carry, jnp.asarray(x))
        with torch.no_grad():
            th, tc = ref(torch.from_numpy(x), (th, tc))
        np.testing.assert_allclose(np.asarray(out), th.numpy(), atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(carry[0]), tc.numpy(), atol=1e-6, rtol=1e-5)


def test_init_forget_bias_and_orthogonal_recurrence():
    h = 6
    cell = LSTMCell(h, forget_bias=1.0)
    z = jnp.zeros((1, h))
    params = nn.unbox(cell.init(jax.random.key(1), (z, z), jnp.zeros((1, 4))))["params"]
    bias = np.asarray(params["bias"])
    np.testing.assert_array_equal(bias[h : 2 * h], 1.0)
    np.testing.assert_array_equal(np.delete(bias, np.s_[h : 2 * h]), 0.0)
    w = np.asarray(params["hidden_kernel"])
    for gate in range(4):
        block = w[:, gate * h : (gate + 1) * h]
        np.testing.assert_allclose(block.T @ block, np.eye(h), atol=1e-5)
