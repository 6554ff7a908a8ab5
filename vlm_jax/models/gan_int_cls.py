"""GAN-INT-CLS (Reed et al. 2016, "Generative Adversarial Text to Image Synthesis"): a DCGAN whose
generator and discriminator both read a sentence embedding.

Text: the sentence embedding is a frozen CLIP text tower's (its tower + text_projection,
L2-normalised), loaded from a CLIP run (train.init_from_map "text:text,text_projection:text_projection").
The tower is model.text.kind's: a TextTransformer, or the paper's char-CNN-RNN (models.char_cnn_rnn,
on a character tokenizer) trained against the images in that CLIP run.

Generator: embedding -> dense to `text_dim` (128) + LeakyReLU(0.2), concatenated with z ~ N(0, I)
(`z_dim`, 100), dense to a 4x4 map of ngf * 2^(n-1) channels, then n - 1 transposed 4x4 stride-2
convolutions with batch norm and ReLU, halving the channels, and a last one to 3 channels with tanh
(n = log2(image_size / 4)). The tanh output in [-1, 1] is mapped to the data normalisation
((x + 1) / 2 - mean) / std, so real and generated images look the same to the discriminator.

Discriminator: n strided 4x4 convolutions (ndf, 2 ndf, ...; LeakyReLU 0.2, batch norm after the
first) down to 4x4; the embedding compressed by a dense layer to `text_dim` + LeakyReLU, tiled over
the 4x4 map and concatenated; a 1x1 convolution with batch norm and LeakyReLU; a 4x4 valid
convolution to one real/fake logit [B].

Options not in the paper (configs/gan_int_cls.py:tiny turns all three on; the README measures
them): the discriminator's norm "spectral" (layers.spectral_norm, in place of its batch norms), a
projection term in its logit (Miyato & Koyama 2018: + <W h, the last features summed over the
map>), and generator batch norms whose scale and shift are read from the text (`TextBatchNorm`,
as BigGAN's conditional batch norm), so the text reaches every resolution of the generator.

Param tree: text/..., text_projection/kernel, generator/..., discriminator/...; batch norm
statistics in the "batch_stats" collection (generator/... and discriminator/...).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers.linear import dense
from vlm_jax.layers.spectral_norm import SpectralConv
from vlm_jax.models import text as text_tower
from vlm_jax.models.clip import frozen_text_embedding

_CONV_AXES = (None, None, "conv_in", "conv_out")
_DCGAN_INIT = nn.initializers.normal(0.02)  # the DCGAN paper's N(0, 0.02) weights


def _num_stages(image_size: int) -> int:
    n = math.log2(image_size / 4)
    if image_size < 8 or n != int(n):
        raise ValueError(f"GAN-INT-CLS: image_size {image_size} must be 4 * 2^n with n >= 1")
    return int(n)


def _bn(train: bool, name: str, affine: bool = True) -> nn.BatchNorm:
    """The players' batch norm; affine=False: no scale and shift of its own (TextBatchNorm's)."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, param_dtype=jnp.float32,
        use_scale=affine, use_bias=affine,
        scale_init=nn.with_logical_partitioning(
            lambda k, s, d=jnp.float32: 1.0 + 0.02 * jax.random.normal(k, s, d), ("conv_out",)
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def _conv(features: int, kernel: int, stride: int, padding: Any, name: str, transpose: bool = False) -> nn.Module:
    cls = nn.ConvTranspose if transpose else nn.Conv
    return cls(
        features, (kernel, kernel), strides=(stride, stride), padding=padding, use_bias=False,
        param_dtype=jnp.float32, kernel_init=nn.with_logical_partitioning(_DCGAN_INIT, _CONV_AXES),
        name=name,
    )


def _leaky(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, 0.2)


class TextBatchNorm(nn.Module):
    """Batch norm whose scale and shift are read from the text (conditional batch norm, as in
    BigGAN; not in the paper): x [B, H, W, C] normalised, then * (1 + dense(h)) + dense(h), the
    dense layers zero-initialised, so it starts as a plain batch norm without scale and shift."""

    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = _bn(self.train, "bn", affine=False)(x)
        zeros = nn.initializers.zeros
        gain = dense(c, ("embed", "mlp"), kernel_init=zeros, name="gain")(h)
        shift = dense(c, ("embed", "mlp"), kernel_init=zeros, name="shift")(h)
        return x * (1.0 + gain[:, None, None, :]) + shift[:, None, None, :]


class Generator(nn.Module):
    """(z [B, z_dim], text embedding [B, E]) -> images [B, S, S, 3] in the data normalisation."""

    image_size: int = 64
    ngf: int = 64
    text_dim: int = 128
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    text_bn: bool = False

    @nn.compact
    def __call__(self, z: jax.Array, embedding: jax.Array, train: bool = False) -> jax.Array:
        n = _num_stages(self.image_size)
        h = _leaky(dense(self.text_dim, ("embed", "mlp"), kernel_init=_DCGAN_INIT, name="text_dense")(embedding))
        x = jnp.concatenate([z.astype(jnp.float32), h], axis=-1)

        def norm(x: jax.Array, name: str) -> jax.Array:
            return TextBatchNorm(train, name=name)(x, h) if self.text_bn else _bn(train, name)(x)

        channels = self.ngf * 2 ** (n - 1)
        x = dense(16 * channels, ("embed", "mlp"), use_bias=False, kernel_init=_DCGAN_INIT, name="project")(x)
        x = nn.relu(norm(x.reshape(x.shape[0], 4, 4, channels), "project_bn"))
        for i in range(n - 1):
            channels //= 2
            x = _conv(channels, 4, 2, "SAME", f"deconv_{i}", transpose=True)(x)
            x = nn.relu(norm(x, f"deconv_{i}_bn"))
        x = jnp.tanh(_conv(3, 4, 2, "SAME", f"deconv_{n - 1}", transpose=True)(x))
        mean, std = jnp.asarray(self.mean, jnp.float32), jnp.asarray(self.std, jnp.float32)
        return ((x + 1.0) / 2.0 - mean) / std


class Discriminator(nn.Module):
    """(images [B, S, S, 3], text embedding [B, E]) -> real/fake logits [B].

    norm "batch" is the paper's (batch norm after every convolution but the first and the
    last); "spectral" (Miyato et al. 2018, not in the paper) divides every convolution's kernel
    by its largest singular value instead (layers.spectral_norm; the text's dense layer stays as
    it is) and drops the batch norms.

    projection=True (Miyato & Koyama 2018, not in the paper) adds to the logit the inner product of
    the last 4x4 features, summed over the map, with a linear map of the text embedding: the text
    then reaches the logit directly, not only through the joint convolution."""

    image_size: int = 64
    ndf: int = 64
    text_dim: int = 128
    norm: str = "batch"
    projection: bool = False

    def _convolve(self, x: jax.Array, train: bool, features: int, kernel: int, stride: int, padding: Any,
                  name: str) -> jax.Array:
        if self.norm == "spectral":
            return SpectralConv(features, kernel, stride, padding, kernel_init=_DCGAN_INIT, name=name)(x, train)
        return _conv(features, kernel, stride, padding, name)(x)

    def _normalise(self, x: jax.Array, train: bool, name: str) -> jax.Array:
        return x if self.norm == "spectral" else _bn(train, name)(x)

    @nn.compact
    def __call__(self, images: jax.Array, embedding: jax.Array, train: bool = False) -> jax.Array:
        if self.norm not in ("batch", "spectral"):
            raise ValueError(f"gan_int_cls: discriminator norm {self.norm!r}; choose 'batch' or 'spectral'")
        n = _num_stages(self.image_size)
        x = images.astype(jnp.float32)
        for i in range(n):
            x = self._convolve(x, train, self.ndf * 2**i, 4, 2, ((1, 1), (1, 1)), f"conv_{i}")
            if i > 0:
                x = self._normalise(x, train, f"conv_{i}_bn")
            x = _leaky(x)
        image_features = jnp.sum(x, axis=(1, 2))  # [B, C]
        h = _leaky(dense(self.text_dim, ("embed", "mlp"), kernel_init=_DCGAN_INIT, name="text_dense")(embedding))
        tiled = jnp.broadcast_to(h[:, None, None, :], x.shape[:3] + (self.text_dim,))
        x = jnp.concatenate([x, tiled], axis=-1)
        x = self._convolve(x, train, x.shape[-1] - self.text_dim, 1, 1, "VALID", "joint")
        x = _leaky(self._normalise(x, train, "joint_bn"))
        logits = self._convolve(x, train, 1, 4, 1, "VALID", "logit").reshape(x.shape[0])
        if self.projection:
            w = dense(image_features.shape[-1], ("embed", "mlp"), kernel_init=_DCGAN_INIT, name="projection")
            logits = logits + jnp.sum(w(embedding) * image_features, axis=-1)
        return logits


class GANINTCLS(nn.Module):
    """Text embedding, generator and discriminator; `__call__` (images, tokens) only for init."""

    text: nn.Module
    generator: Generator
    discriminator: Discriminator
    embed_dim: int = 32
    z_dim: int = 100

    def setup(self) -> None:
        self.text_projection = dense(self.embed_dim, ("embed", "mlp"), use_bias=False)

    def embed_text(self, tokens: jax.Array) -> jax.Array:
        """tokens int [B, L] -> the CLIP text embedding [B, E] scaled to norm sqrt(E), without
        gradient (models.clip.frozen_text_embedding)."""
        return frozen_text_embedding(self.text, self.text_projection, tokens)

    def generate(self, z: jax.Array, embedding: jax.Array, train: bool = False) -> jax.Array:
        """z [B, z_dim], embedding [B, E] -> images [B, S, S, 3], data-normalised."""
        return self.generator(z, embedding, train=train)

    def discriminate(self, images: jax.Array, embedding: jax.Array, train: bool = False) -> jax.Array:
        """images [B, S, S, 3], embedding [B, E] -> logits [B] (real and matching: high)."""
        return self.discriminator(images, embedding, train=train)

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Every part once (what init needs): the generated images and both logits."""
        embedding = self.embed_text(tokens)
        z = jnp.zeros((tokens.shape[0], self.z_dim), jnp.float32)
        fake = self.generate(z, embedding, train=train)
        return dict(
            fake=fake,
            real_logits=self.discriminate(images, embedding, train=train),
            fake_logits=self.discriminate(fake, embedding, train=train),
        )


def from_config(cfg: ml_collections.ConfigDict) -> GANINTCLS:
    """The model of a `gan_int_cls` model section (text = a CLIP text tower's settings)."""
    if cfg.get("text_encoder", "clip") != "clip":
        raise ValueError(
            f"gan_int_cls text_encoder {cfg.text_encoder!r}: the text encoder is always a CLIP run's text "
            "tower; model.text.kind picks it ('transformer', or 'char_cnn_rnn' for the paper's encoder)"
        )
    size = int(cfg.image_size)
    return GANINTCLS(
        text=text_tower.tower_from_config(cfg.text),
        generator=Generator(
            image_size=size, ngf=int(cfg.ngf), text_dim=int(cfg.text_dim),
            mean=tuple(cfg.get("mean", (0.5,) * 3)), std=tuple(cfg.get("std", (0.5,) * 3)),
            text_bn=bool(cfg.get("g_text_bn", False)),
        ),
        discriminator=Discriminator(image_size=size, ndf=int(cfg.ndf), text_dim=int(cfg.text_dim),
                                    norm=str(cfg.get("d_norm", "batch")),
                                    projection=bool(cfg.get("d_projection", False))),
        embed_dim=int(cfg.embed_dim),
        z_dim=int(cfg.z_dim),
    )
