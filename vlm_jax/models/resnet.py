"""Convolutional image towers: CLIP's ModifiedResNet (Radford et al. 2021) and a small CNN.

ModifiedResNet: a 3-conv stem with average pooling, bottleneck stages that downsample by average
pooling before the 1x1 expansion (anti-aliased strided convs), and attention pooling of the last
feature map with a learned positional embedding. Its BatchNorms keep running statistics in the
"batch_stats" collection: call it with train=True and mutable=["batch_stats"] while training.

SmallCNN: conv 3x3 -> LayerNorm over channels -> ReLU -> 2x2 max pool, per stage, then global mean
pooling and a projection. No BatchNorm, so it needs no batch_stats; quick on a CPU at 32x32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers.attention import MultiHeadAttention
from vlm_jax.layers.conv import conv_with_matmul_wgrad
from vlm_jax.layers.linear import dense
from vlm_jax.layers.norms import LayerNorm

_CONV_AXES = (None, None, "conv_in", "conv_out")


def _conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    use_bias: bool = False,
    dtype: Any,
    name: str,
    matmul_wgrad: bool = False,
) -> nn.Conv:
    """k x k conv with torch-style symmetric padding k//2 (so imported weights line up).

    matmul_wgrad: 3x3 stride-1 convs take their weight gradient from `layers.conv.conv3x3` (same
    values).
    """
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.variance_scaling(2.0, "fan_out", "normal"), _CONV_AXES
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        conv_general_dilated=conv_with_matmul_wgrad if matmul_wgrad else None,
        name=name,
    )


def _batch_norm(train: bool, dtype: Any, name: str, zero_scale: bool = False) -> nn.BatchNorm:
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(scale_init, ("conv_out",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def _avg_pool(x: jax.Array, stride: int) -> jax.Array:
    return nn.avg_pool(x, (stride, stride), strides=(stride, stride)) if stride > 1 else x


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> [avg pool] -> 1x1 (x4) with a residual: [B, H, W, C] -> [B, H/s, W/s, 4p]."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x [B, H, W, C] -> [B, H/stride, W/stride, 4 * planes]."""
        out_ch = self.planes * 4
        y = _conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
        y = _conv(self.planes, 3, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(_batch_norm(train, self.dtype, "bn2")(y))
        y = _avg_pool(y, self.stride)
        y = _conv(out_ch, 1, dtype=self.dtype, name="conv3")(y)
        # Zero-init last norm: each block starts as the identity, as in CLIP's initialisation.
        y = _batch_norm(train, self.dtype, "bn3", zero_scale=True)(y)
        shortcut = x
        if self.stride > 1 or x.shape[-1] != out_ch:
            shortcut = _avg_pool(x, self.stride)
            shortcut = _conv(out_ch, 1, dtype=self.dtype, name="downsample_conv")(shortcut)
            shortcut = _batch_norm(train, self.dtype, "downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class AttentionPool(nn.Module):
    """The mean token (+ positions) attends over the map: [B, H, W, C] -> [B, out_features]."""

    num_heads: int
    out_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> [B, out_features]."""
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        mean = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True).astype(x.dtype)
        x = jnp.concatenate([mean, x], axis=1)
        pos = self.param(
            "pos_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(c**-0.5), ("length", "embed")),
            (h * w + 1, c),
            jnp.float32,
        )
        x = x + pos.astype(x.dtype)
        out = MultiHeadAttention(
            self.num_heads, out_features=self.out_features, dtype=self.dtype, name="attn"
        )(x[:, :1], x)
        return out[:, 0]


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower: images [B, S, S, 3] -> [B, output_dim] (float32)."""

    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    heads: int = 32
    output_dim: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images [B, S, S, 3] (S divisible by 32) -> [B, output_dim]."""
        x = images.astype(self.dtype)
        stem = ((self.width // 2, 2), (self.width // 2, 1), (self.width, 1))
        for i, (features, stride) in enumerate(stem, start=1):
            x = _conv(features, 3, stride=stride, dtype=self.dtype, name=f"stem_conv{i}")(x)
            x = nn.relu(_batch_norm(train, self.dtype, f"stem_bn{i}")(x))
        x = _avg_pool(x, 2)
        for i, blocks in enumerate(self.layers):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = Bottleneck(self.width * 2**i, stride, self.dtype, name=f"layer{i + 1}_{j}")(
                    x, train
                )
        x = nn.with_logical_constraint(x, ("batch", None, None, "conv_out"))
        return AttentionPool(self.heads, self.output_dim, self.dtype, name="attnpool")(x).astype(
            jnp.float32
        )


NORMS = ("layer", "none")


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pool, stride 2, of [B, H, W, C] (H, W even) as a reshape and a max.

    The same values as nn.max_pool, but its gradient is an elementwise select instead of XLA's
    select-and-scatter, which on the CPU made the pool cost as much as the convolutions. The select
    is a one-hot of each window's argmax, so the gradient goes to exactly one element: the gradient
    of a max reduction (g * [x == max] / count) divides by the number of elements equal to the max,
    which is 0 (a NaN gradient) when the compiler computes x once for the max and again, rounded
    differently, for the comparison (seen on the CPU at -O0).
    """
    b, h, w, c = x.shape
    windows = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)
    pick = jnp.argmax(windows, axis=-1)[..., None] == jnp.arange(4)
    return jnp.sum(jnp.where(pick, windows, 0), axis=-1)


class SmallCNN(nn.Module):
    """images [B, H, W, C] -> [B, output_dim] (f32): conv stages, mean pool, projection.

    `encode` also returns one stage's feature map before its pool (`grid_stage`, default the last:
    where VGG-16's conv5_3 sits for Show, Attend and Tell): the annotation grid of a captioner
    that attends.
    """

    channels: tuple[int, ...] = (32, 64, 128, 128)
    output_dim: int = 128
    norm: str = "layer"
    pool: str = "mean"  # mean: global average; flatten: keep the final grid (where things are)
    grid_stage: int = -1  # the stage whose map (before its pool) `encode` returns as the grid
    dtype: Any = jnp.float32

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images [B, H, W, C] (H, W divisible by 2**len(channels)) -> [B, output_dim]."""
        return self.encode(images, train)["pooled"]

    @nn.compact
    def encode(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """images [B, H, W, C] -> {"pooled": f32 [B, output_dim], "grid": [B, H/2**s, W/2**s,
        channels[s]]}: the grid is stage s = grid_stage after its conv, norm and relu, before its
        pool."""
        del train  # No batch-dependent layers.
        if self.norm not in NORMS:
            raise ValueError(f"SmallCNN norm {self.norm!r}: choose one of {NORMS}")
        n = len(self.channels)
        if not -n <= self.grid_stage < n:
            raise ValueError(f"SmallCNN grid_stage {self.grid_stage} is not one of its {n} stages")
        step = 2 ** len(self.channels)
        if images.shape[1] % step or images.shape[2] % step:
            raise ValueError(
                f"SmallCNN with {len(self.channels)} 2x2 pools needs image sides divisible by {step}, "
                f"got {images.shape[1]}x{images.shape[2]}"
            )
        x = images.astype(self.dtype)
        grid = None
        for i, features in enumerate(self.channels):
            conv = _conv(features, 3, use_bias=self.norm == "none", dtype=self.dtype, name=f"conv{i}",
                         matmul_wgrad=True)
            x = conv(x)
            if self.norm == "layer":
                x = LayerNorm(1e-5, self.dtype, axis_name="conv_out", name=f"norm{i}")(x)
            if i == self.grid_stage % n:
                grid = nn.relu(x)
            x = nn.relu(_max_pool_2x2(x))  # = max_pool(relu(x)), a quarter of the relu work
        if self.pool == "flatten":
            x = x.reshape(x.shape[0], -1)
        elif self.pool == "mean":
            x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        else:
            raise ValueError(f"SmallCNN pool {self.pool!r}: choose mean or flatten")
        pooled = dense(self.output_dim, ("conv_out", "embed"), dtype=self.dtype, name="proj")(x)
        return {"pooled": pooled.astype(jnp.float32), "grid": grid}


def from_config(cfg: ml_collections.ConfigDict, **overrides: Any) -> nn.Module:
    """ModifiedResNet (kind "resnet") or SmallCNN (kind "cnn") from an image-tower section."""
    get = lambda key, default: overrides.get(key, cfg.get(key, default))  # noqa: E731
    kind = get("kind", "resnet")
    dtype = jnp.dtype(get("dtype", "float32"))
    if kind == "resnet":
        width = get("width", 64)
        return ModifiedResNet(
            layers=tuple(get("layers", (3, 4, 6, 3))),
            width=width,
            heads=get("heads", 32),
            output_dim=get("output_dim", width * 32),
            dtype=dtype,
        )
    if kind == "cnn":
        channels = tuple(get("channels", (32, 64, 128, 128)))
        return SmallCNN(
            channels=channels,
            output_dim=get("output_dim", channels[-1]),
            norm=get("norm", "layer"),
            pool=get("pool", "mean"),
            grid_stage=get("grid_stage", -1),
            dtype=dtype,
        )
    raise ValueError(f"resnet.from_config: kind {kind!r} is neither 'resnet' nor 'cnn'")
