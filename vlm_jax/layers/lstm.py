"""An LSTM cell with one fused gate projection and a forget-gate bias of 1 at init.

    gates = x W_x + h W_h + b                         (W_x [in, 4H], W_h [H, 4H], b [4H])
    i, f, g, o = split(gates)                         (PyTorch's gate order)
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g),   h' = sigmoid(o) * tanh(c')

The forget gate's bias starts at `forget_bias` (1.0), as in Jozefowicz et al. 2015 and
TensorFlow's LSTM cells (the cells Show and Tell was trained with): with a zero bias the cell
halves its memory at every step, so what it read at t = -1 (Show and Tell's image) has faded to
a few percent of itself by the colour word and its gradient with it, and a captioner settles on
the caption prior. flax's LSTM cells start every gate bias at zero.

Converting from PyTorch's nn.LSTM / nn.LSTMCell (weight_ih [4H, in], weight_hh [4H, H], bias_ih,
bias_hh, same gate order): input_kernel = weight_ih.T, hidden_kernel = weight_hh.T,
bias = bias_ih + bias_hh.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _gate_bias(hidden: int, forget_bias: float):
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.zeros(shape, dtype).at[hidden : 2 * hidden].set(forget_bias)

    return init


class LSTMCell(nn.Module):
    """((c, h) f32 [B, H], x [B, in]) -> ((c', h'), h'). Params: input_kernel [in, 4H] (Xavier),
    hidden_kernel [H, 4H] (orthogonal per gate), bias [4H] (forget slice = forget_bias). The state
    is f32; the matmuls run in `dtype`."""

    hidden: int
    forget_bias: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, jax.Array], x: jax.Array):
        c, h = carry
        width = 4 * self.hidden
        w_x = self.param(
            "input_kernel",
            nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", "mlp")),
            (x.shape[-1], width),
            jnp.float32,
        )
        # Orthogonal recurrent weights, one block per gate (flax's LSTM cells do the same).
        w_h = self.param(
            "hidden_kernel",
            nn.with_logical_partitioning(
                lambda key, shape, dtype=jnp.float32: jnp.concatenate(
                    [nn.initializers.orthogonal()(k, (shape[0], self.hidden), dtype) for k in jax.random.split(key, 4)],
                    axis=1,
                ),
                (None, "mlp"),
            ),
            (self.hidden, width),
            jnp.float32,
        )
        b = self.param(
            "bias", nn.with_logical_partitioning(_gate_bias(self.hidden, self.forget_bias), ("mlp",)), (width,),
            jnp.float32,
        )
        gates = (
            jnp.dot(x.astype(self.dtype), w_x.astype(self.dtype), preferred_element_type=jnp.float32)
            + jnp.dot(h.astype(self.dtype), w_h.astype(self.dtype), preferred_element_type=jnp.float32)
            + b
        )
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
        h = nn.sigmoid(o) * jnp.tanh(c)
        return (c, h), h
