"""2-D convolutions, NHWC x HWIO.

* `conv3x3` / `conv_with_matmul_wgrad`: convolutions with a matmul weight gradient: XLA's CPU
  weight-gradient convolution is several times slower than the same arithmetic as matmuls, the
  largest cost of small conv towers' steps (the world CLIP's SmallCNN, the DALL-E tokenizer).
  Used by models.resnet and, through `conv2d`, by models.dvae and the diffusion models.
* `conv2d`: the k x k conv layer of models.dvae, models.unet and models.autoencoder_kl: float32
  params with logical axes, 'same' padding unless given, 3x3 stride-1 convs through
  `conv_with_matmul_wgrad`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_NHWC = ("NHWC", "HWIO", "NHWC")
CONV_AXES = (None, None, "conv_in", "conv_out")
# Variance 1 / fan_in, untruncated normal: conv2d's default kernel init.
FAN_IN_NORMAL = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
# PyTorch's Conv2d / Linear default (kaiming-uniform with a = sqrt(5): variance 1 / (3 fan_in)).
TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


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


def conv2d(
    features: int, kernel: int, dtype: Any, name: str, stride: int = 1, padding: Any = None,
    kernel_init: Any = None, axes: tuple[str | None, ...] = CONV_AXES,
) -> nn.Conv:
    """A k x k nn.Conv (to apply to NHWC inputs): 'same' padding (k // 2 each side) unless `padding`
    is given, float32 params, kernel [k, k, C_in, features] named `axes` (CONV_AXES) with
    `kernel_init` (None: FAN_IN_NORMAL), bias [features] named (axes[-1],) starting at zero. 3x3
    stride-1 convs take their weight gradient as matmuls (conv_with_matmul_wgrad: the same values)."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)) if padding is None else padding,
        conv_general_dilated=conv_with_matmul_wgrad if kernel == 3 and stride == 1 else None,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init or FAN_IN_NORMAL, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)),
        name=name,
    )
