"""Image tokenizers for DALL-E: the discrete VAE (Ramesh et al. 2021, sec. 2.1, appendix A) and a
VQ-VAE variant on `vlm_jax.layers.quantizer.VectorQuantizer`.

Both share the paper's convolutional ResNet encoder and decoder:

* Encoder: a k x k input conv (7 x 7 in the paper) to `hidden` channels, then `len(channel_mults)`
  groups of `blocks_per_group` residual blocks, group g `hidden * channel_mults[g]` wide, with a
  2 x 2 max pool between groups; so an S x S image becomes an (S / 2**(groups - 1))-sided grid.
* Residual block: id_path (a 1 x 1 conv when the width changes) + post_gain * res_path, the res
  path relu-conv3x3-relu-conv3x3-relu-conv3x3-relu-conv1x1 through `width // 4` channels, with
  post_gain = 1 / (number of blocks)**2 as in the paper.
* Decoder: from an [B, h, w, embed_dim] map, the groups in reverse order of widths with a 2 x 2
  nearest upsampling between them, then relu and a 1 x 1 conv to 3 channels: the image in the data
  normalisation (the pipeline's `normalise`), which the reconstruction loss compares to the input.

kind "dvae": the encoder ends in relu + 1 x 1 conv to `num_codes` logits per grid cell. Training
feeds the decoder a Gumbel-softmax sample of them (temperature a call argument, noise from the
"dropout" rng stream) multiplied into the code embedding `params/codebook/embedding` [K, embed_dim]
(the paper's 1 x 1 conv from the one-hot map to 128 channels); evaluation feeds the one-hot argmax.
kind "vqvae": the encoder ends in relu + 1 x 1 conv to `embed_dim`, quantised by VectorQuantizer
(named "codebook"; EMA codebook and dead-code restarts in the "vq_stats" collection).

The tokenizer API that the DALL-E transformer stage uses: `encode_codes(images) -> int32 [B, h, w]`
and `decode_codes(codes) -> [B, S, S, 3]` (hard codes both ways).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers.conv import conv2d
from vlm_jax.layers.quantizer import VectorQuantizer

KINDS = ("dvae", "vqvae")
# VectorQuantizer's own default (variance 1/d), here boxed with logical axes when it is a param.
_VQ_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=-1, out_axis=-2)


class ResBlock(nn.Module):
    """The paper's residual block: x [B, H, W, C] -> [B, H, W, features]."""

    features: int
    post_gain: float = 1.0  # the paper's 1 / (number of blocks)**2: each block starts near the identity
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> id_path(x) + post_gain * res_path(x), [B, H, W, features]."""
        hidden = max(self.features // 4, 1)
        shortcut = x if x.shape[-1] == self.features else conv2d(self.features, 1, self.dtype, "id_path")(x)
        h = x
        for i, (features, kernel) in enumerate(((hidden, 3), (hidden, 3), (hidden, 3), (self.features, 1)), 1):
            h = conv2d(features, kernel, self.dtype, f"conv{i}")(nn.relu(h))
        return shortcut + self.post_gain * h


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _upsample_2x(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Encoder(nn.Module):
    """images [B, S, S, 3] -> [B, S / 2**(groups-1), ..., out_features] (relu + 1 x 1 conv at the end)."""

    hidden: int
    channel_mults: tuple[int, ...]
    blocks_per_group: int
    out_features: int
    out_axis: str  # logical name of the output channels ("codebook" for logits, "conv_out" for vectors)
    out_name: str
    input_kernel: int = 7
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images [B, S, S, 3] -> float32 [B, h, w, out_features]."""
        gain = 1.0 / (len(self.channel_mults) * self.blocks_per_group) ** 2
        x = conv2d(self.hidden, self.input_kernel, self.dtype, "input")(images.astype(self.dtype))
        for g, mult in enumerate(self.channel_mults):
            if g:
                x = _max_pool_2x2(x)
            for b in range(self.blocks_per_group):
                x = ResBlock(self.hidden * mult, gain, self.dtype, name=f"group{g}_block{b}")(x)
        axes = (None, None, "conv_in", self.out_axis)
        out = conv2d(self.out_features, 1, self.dtype, self.out_name, axes=axes)(nn.relu(x))
        return out.astype(jnp.float32)


class Decoder(nn.Module):
    """[B, h, w, embed_dim] -> images [B, h * 2**(groups-1), ..., 3] in the data normalisation."""

    hidden: int
    channel_mults: tuple[int, ...]
    blocks_per_group: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, h, w, E] -> float32 [B, h * 2**(groups-1), w * 2**(groups-1), 3]."""
        gain = 1.0 / (len(self.channel_mults) * self.blocks_per_group) ** 2
        x = x.astype(self.dtype)
        for g, mult in enumerate(reversed(self.channel_mults)):
            if g:
                x = _upsample_2x(x)
            for b in range(self.blocks_per_group):
                x = ResBlock(self.hidden * mult, gain, self.dtype, name=f"group{g}_block{b}")(x)
        return conv2d(3, 1, self.dtype, "output")(nn.relu(x)).astype(jnp.float32)


def gumbel_softmax(rng: jax.Array, logits: jax.Array, temperature: jax.Array | float) -> jax.Array:
    """A relaxed one-hot sample, softmax((logits + Gumbel noise) / temperature) over the last axis,
    float32, same shape as logits."""
    u = jax.random.uniform(rng, logits.shape, jnp.float32, minval=1e-6, maxval=1.0 - 1e-6)
    gumbel = -jnp.log(-jnp.log(u))
    return jax.nn.softmax((logits.astype(jnp.float32) + gumbel) / temperature, axis=-1)


def code_statistics(codes: jax.Array, num_codes: int) -> dict[str, jax.Array]:
    """Codebook use of int codes [...] in [0, num_codes): perplexity (exp of the entropy of their
    histogram) and dead_codes (how many codes do not occur), float32 scalars."""
    counts = jax.ops.segment_sum(jnp.ones(codes.size, jnp.float32), codes.reshape(-1), num_segments=num_codes)
    probs = counts / jnp.maximum(codes.size, 1)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
    return {"perplexity": jnp.exp(entropy), "dead_codes": jnp.sum(counts == 0).astype(jnp.float32)}


class DVAE(nn.Module):
    """The DALL-E image tokenizer (kind "dvae") or its VQ-VAE variant (kind "vqvae"); see the module doc.

    Attributes:
      kind: "dvae" or "vqvae".
      num_codes: codebook size K.
      hidden: width of the first group (the paper's n_hid, 256).
      channel_mults: per group, its width in units of `hidden` (the paper's (1, 2, 4, 8)).
      blocks_per_group: residual blocks per group (the paper's released model: 2).
      embed_dim: width of the code embedding the decoder reads (the paper's n_init, 128); for
        "vqvae" also the width of the codebook vectors.
      input_kernel: side of the encoder's first conv (7 in the paper).
      vq: VectorQuantizer settings for "vqvae" (beta, decay, dead_code_threshold, impl, ...).
    """

    kind: str = "dvae"
    num_codes: int = 8192
    hidden: int = 256
    channel_mults: tuple[int, ...] = (1, 2, 4, 8)
    blocks_per_group: int = 2
    embed_dim: int = 128
    input_kernel: int = 7
    vq: Any = None
    dtype: Any = jnp.float32

    def setup(self):
        if self.kind not in KINDS:
            raise ValueError(f"dvae kind {self.kind!r}: choose one of {KINDS}")
        dvae = self.kind == "dvae"
        self.encoder = Encoder(
            self.hidden, tuple(self.channel_mults), self.blocks_per_group,
            self.num_codes if dvae else self.embed_dim, "codebook" if dvae else "conv_out",
            "codebook_logits" if dvae else "to_codebook", self.input_kernel, self.dtype,
        )
        self.decoder = Decoder(self.hidden, tuple(self.channel_mults), self.blocks_per_group, self.dtype)
        if dvae:
            self.embedding = self.param(
                "codebook_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(1.0), ("codebook", "conv_out")),
                (self.num_codes, self.embed_dim),
                jnp.float32,
            )
        else:
            settings = dict(self.vq or {})
            if not settings.get("ema", False):  # the codebook is then a param: give it logical axes
                settings.setdefault("codebook_init", nn.with_logical_partitioning(_VQ_INIT, ("codebook", "conv_out")))
            self.codebook = VectorQuantizer(self.num_codes, **settings, name="codebook")

    @property
    def downsample(self) -> int:
        """Image side / grid side."""
        return 2 ** (len(self.channel_mults) - 1)

    def _check_images(self, images: jax.Array) -> None:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"dvae: images must be [B, S, S, 3], got shape {images.shape}")
        if images.shape[1] % self.downsample or images.shape[2] % self.downsample:
            raise ValueError(
                f"dvae with {len(self.channel_mults)} groups needs image sides divisible by "
                f"{self.downsample}, got {images.shape[1]}x{images.shape[2]}"
            )

    def encode_codes(self, images: jax.Array) -> jax.Array:
        """images [B, S, S, 3] (normalised) -> int32 codes [B, S/f, S/f] (argmax logit or nearest code)."""
        self._check_images(images)
        features = self.encoder(images)
        if self.kind == "dvae":
            return jnp.argmax(features, axis=-1).astype(jnp.int32)
        return self.codebook.encode(features).astype(jnp.int32)

    def code_vectors(self) -> jax.Array:
        """Every code's vector [K, embed_dim], float32: what the decoder reads for each code."""
        return self.embedding if self.kind == "dvae" else self.codebook.get_codebook().astype(jnp.float32)

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """int codes [B, h, w] in [0, num_codes) -> images float32 [B, h*f, w*f, 3] (data normalisation)."""
        if codes.ndim != 3 or not jnp.issubdtype(codes.dtype, jnp.integer):
            raise ValueError(f"dvae.decode_codes wants int codes [B, h, w], got {codes.dtype} {codes.shape}")
        if self.kind == "dvae":
            vectors = jnp.take(self.embedding, codes, axis=0)
        else:
            vectors = self.codebook.lookup(codes)
        return self.decoder(vectors)

    def __call__(
        self, images: jax.Array, *, train: bool = False, temperature: jax.Array | float = 1.0,
        straight_through: bool = False,
    ) -> dict[str, jax.Array]:
        """images [B, S, S, 3] -> dict with "reconstruction" f32 [B, S, S, 3], "codes" int32 [B, h, w],
        "perplexity" and "dead_codes" of this batch's codes, and

        * dvae: "logits" f32 [B, h, w, K]; with train=True the decoder reads a Gumbel-softmax sample
          at `temperature` (rng stream "dropout"), else the one-hot argmax; straight_through: the
          sample's one-hot argmax forward, the relaxed sample's gradient backward;
        * vqvae: the quantiser's "commitment_loss", "codebook_loss", "vq_loss" (their sum) and
          "restarted"; with train=True (and mutable "vq_stats") its EMA statistics update.
        """
        self._check_images(images)
        features = self.encoder(images)
        if self.kind == "dvae":
            codes = jnp.argmax(features, axis=-1).astype(jnp.int32)
            if train:
                z = gumbel_softmax(self.make_rng("dropout"), features, temperature)
                if straight_through:
                    hard = jax.nn.one_hot(jnp.argmax(z, axis=-1), self.num_codes, dtype=z.dtype)
                    z = hard + z - jax.lax.stop_gradient(z)
            else:
                z = jax.nn.one_hot(codes, self.num_codes, dtype=jnp.float32)
            vectors = jnp.einsum("bhwk,ke->bhwe", z, self.embedding)
            out = {"logits": features}
        else:
            vectors, aux = self.codebook(features, train=train)
            codes = aux["indices"].astype(jnp.int32)
            out = {
                "commitment_loss": aux["commitment_loss"],
                "codebook_loss": aux["codebook_loss"],
                "vq_loss": aux["loss"],
                "restarted": aux["restarted"].astype(jnp.float32),
            }
        out.update(code_statistics(codes, self.num_codes))
        out.update(reconstruction=self.decoder(vectors), codes=codes)
        return out


def from_config(cfg: ml_collections.ConfigDict) -> nn.Module:
    """DVAE from a model section: kind, num_codes, hidden, channel_mults, blocks_per_group,
    embed_dim, input_kernel, dtype, and vq (a dict of VectorQuantizer settings, kind "vqvae")."""
    vq = cfg.get("vq") or {}
    vq = dict(vq.to_dict() if isinstance(vq, ml_collections.ConfigDict) else vq)
    if "search_dtype" in vq:
        vq["search_dtype"] = jnp.dtype(vq["search_dtype"])
    return DVAE(
        kind=cfg.get("kind", "dvae"),
        num_codes=int(cfg.get("num_codes", 8192)),
        hidden=int(cfg.get("hidden", 256)),
        channel_mults=tuple(cfg.get("channel_mults", (1, 2, 4, 8))),
        blocks_per_group=int(cfg.get("blocks_per_group", 2)),
        embed_dim=int(cfg.get("embed_dim", 128)),
        input_kernel=int(cfg.get("input_kernel", 7)),
        vq=tuple(sorted(vq.items())),  # hashable: a model is a static argument of jitted samplers
        dtype=jnp.dtype(cfg.get("dtype", "float32")),
    )
