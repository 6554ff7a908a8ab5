"""Convolutions with a matmul weight gradient: XLA's CPU weight-gradient convolution is several
times slower than the same arithmetic as matmuls, the largest cost of small conv towers' steps
(the world CLIP's SmallCNN, the DALL-E tokenizer). Used by models.resnet and models.dvae.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NHWC = ("NHWC", "HWIO", "NHWC")


def _plain_conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


@jax.custom_vjp
def conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """3x3 stride-1 'same' convolution, NHWC x HWIO -> NHWC, with a matmul weight gradient.

    The value and the input gradient are XLA's. The weight gradient is written as nine
    matmuls, dw[i, j] = shift_ij(x)^T @ g over all B*H*W positions: on the CPU, XLA's own
    weight-gradient convolution ran at a third of its matmul speed (41 ms vs 26 ms for the
    16x16x32->64 layer at batch 128), the largest single cost of the tiny CLIP's step.
    """
    return _plain_conv3x3(x, w)


def _conv3x3_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _plain_conv3x3(x, w), (x, w)


def _conv3x3_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    dx = jax.vjp(lambda x: _plain_conv3x3(x, w), x)[1](g)[0]
    b, h, wd, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    g2 = g.reshape(-1, g.shape[-1])
    rows = [
        [
            jnp.matmul(padded[:, i : i + h, j : j + wd].reshape(-1, c).T, g2,
                       preferred_element_type=jnp.float32)
            for j in range(3)
        ]
        for i in range(3)
    ]
    return dx, jnp.stack([jnp.stack(r) for r in rows]).astype(w.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def conv_with_matmul_wgrad(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, **kwargs):
    """lax.conv_general_dilated (flax's nn.Conv(conv_general_dilated=...) hook), routed to conv3x3
    for the one case it covers: 3x3, stride 1, padding 1, NHWC x HWIO, no groups or dilation."""
    simple = (
        tuple(window_strides) == (1, 1) and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
        and rhs.shape[:2] == (3, 3) and feature_group_count == 1
        and all(d in (None, (1, 1)) for d in (lhs_dilation, rhs_dilation))
        and dimension_numbers is not None and tuple(dimension_numbers) == jax.lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, _NHWC)
        and kwargs.get("precision") is None and kwargs.get("preferred_element_type") is None
    )
    if simple:
        return conv3x3(lhs, rhs)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, **kwargs,
    )
