"""Image degradations for training super-resolution models (the diffusion upsamplers of unCLIP,
Ramesh et al. 2022, and of latent diffusion's BSR upsampler, Rombach et al. 2022): resampling,
Gaussian blur, Gaussian noise, JPEG-like quantisation, conditioning noise, and `low_res`, the
random mix that turns a batch of high-resolution images into the low-resolution input a model
learns to undo.

Every function is pure jax, batched over a leading axis, jit-able (shapes, the factor, kernel
radii and kinds are static; per-example strengths are traced) and, where random, deterministic
given its key. Images are NHWC float [B, H, W, C] in the data's normalisation (about [-1, 1]);
`value_range` (per channel, or one pair) names the values that pixel 0 and 255 map to, for the
operations that work in pixel units (JPEG) or clip to the valid range.

Kinds of `low_res` (f the factor; sigma in low-resolution pixels):

    "none"  area downsampling by f (the mean of each f x f block).
    "blur"  area downsampling, then a Gaussian blur of sigma ~ U[blur_sigma] per example (the
            corruption of unCLIP's first upsampler, after Saharia et al. / Ho et al.'s cascades).
    "bsr"   a cheap BSR-style mix (after Zhang et al. 2021's degradation model): per example,
            with probability p each, a Gaussian blur at the high resolution (sigma ~ U[blur_sigma]
            times f); downsampling by a method drawn from DOWN_METHODS; additive Gaussian noise of
            std ~ U[noise_std]; JPEG-like quantisation at quality ~ U[jpeg_quality] (`jpeg`: 8x8
            block DCT of YCbCr with the standard tables scaled as libjpeg scales them, no chroma
            subsampling, no entropy coding); the result clipped to the value range. The order is
            fixed (BSR shuffles it).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("none", "blur", "bsr")
DOWN_METHODS = ("area", "bilinear", "bicubic", "nearest")
_MIN_SIGMA = 1e-3  # a blur below this is the identity (its kernel underflows to a delta)

# The JPEG standard's (Annex K) luminance and chrominance quantisation tables at quality 50.
_LUMA = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.float32)
_CHROMA = np.full((8, 8), 99, np.float32)
_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                       np.float32)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The strengths of `low_res`'s random degradations (ranges are (low, high), drawn uniformly
    per example). blur_sigma: in low-resolution pixels; noise_std: in data units; jpeg_quality:
    1..100; prob: the chance of each of bsr's blur, noise and JPEG steps; value_range: the data
    values of pixel 0 and 255 (per channel [C] or scalars)."""

    blur_sigma: tuple[float, float] = (0.4, 0.6)
    noise_std: tuple[float, float] = (0.0, 0.1)
    jpeg_quality: tuple[float, float] = (30.0, 95.0)
    prob: float = 0.5
    value_range: tuple = (-1.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("blur_sigma", "noise_std", "jpeg_quality"):
            lo, hi = (float(v) for v in getattr(self, name))
            if not 0 <= lo <= hi:
                raise ValueError(f"degrade: {name} must be a range (low, high) with 0 <= low <= high, got {(lo, hi)}")
        if not 1 <= float(self.jpeg_quality[0]) <= float(self.jpeg_quality[1]) <= 100:
            raise ValueError(f"degrade: jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        if not 0 <= float(self.prob) <= 1:
            raise ValueError(f"degrade: prob must lie in [0, 1], got {self.prob}")


def _range(value_range, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    lo, hi = value_range
    return jnp.asarray(lo, like.dtype), jnp.asarray(hi, like.dtype)


def _check(images: jax.Array, factor: int = 1) -> None:
    if images.ndim != 4:
        raise ValueError(f"degrade: images must be [B, H, W, C], got shape {images.shape}")
    if int(factor) < 1 or images.shape[1] % factor or images.shape[2] % factor:
        raise ValueError(f"degrade: factor {factor} does not divide the image size {images.shape[1]}x{images.shape[2]}")


def downsample(images: jax.Array, factor: int, method: str = "area") -> jax.Array:
    """[B, H, W, C] -> [B, H/f, W/f, C]: "area" the mean of each f x f block; "bilinear" /
    "bicubic" antialiased (the kernel stretched by f, jax.image.resize); "nearest" the pixel at
    offset f // 2 of each block."""
    _check(images, factor)
    if method not in DOWN_METHODS:
        raise ValueError(f"degrade: downsampling method {method!r}: choose one of {DOWN_METHODS}")
    if factor == 1:
        return images
    b, h, w, c = images.shape
    if method == "area":
        return images.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    if method == "nearest":
        return images[:, factor // 2 :: factor, factor // 2 :: factor]
    kind = "linear" if method == "bilinear" else "cubic"
    return jax.image.resize(images, (b, h // factor, w // factor, c), kind, antialias=True)


def upsample(images: jax.Array, size: int) -> jax.Array:
    """[B, h, w, C] -> [B, size, size, C], bilinear (half-pixel centres, edges clamped)."""
    if images.ndim != 4:
        raise ValueError(f"degrade: images must be [B, H, W, C], got shape {images.shape}")
    b, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    return jax.image.resize(images, (b, size, size, c), "linear")


def gaussian_kernels(sigma: jax.Array, radius: int) -> jax.Array:
    """sigma [B] (pixels; below 1e-3 taken as 1e-3: a delta) -> normalised 1-D kernels [B, 2r+1]."""
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    s = jnp.maximum(jnp.asarray(sigma, jnp.float32), _MIN_SIGMA)[:, None]
    k = jnp.exp(-0.5 * jnp.square(x[None, :] / s))
    return k / k.sum(axis=1, keepdims=True)


def blur_radius(max_sigma: float) -> int:
    """The kernel radius that holds a Gaussian of max_sigma to 3 sigma (at least 1)."""
    return max(1, int(math.ceil(3.0 * float(max_sigma))))


def blur(images: jax.Array, sigma: jax.Array | float, radius: int) -> jax.Array:
    """Separable Gaussian blur, one sigma per example (sigma [B] or a scalar), kernel radius r
    (static); borders extended by their edge pixels, so a constant image stays that constant."""
    _check(images)
    b, h, w, _ = images.shape
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))
    k = gaussian_kernels(sigma, radius).astype(images.dtype)  # [B, 2r+1]
    x = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(k[:, i, None, None, None] * x[:, i : i + h] for i in range(2 * radius + 1))
    return sum(k[:, i, None, None, None] * rows[:, :, i : i + w] for i in range(2 * radius + 1))


def add_noise(images: jax.Array, rng: jax.Array, std: jax.Array | float) -> jax.Array:
    """images + std * N(0, I), std [B] or a scalar."""
    std = jnp.broadcast_to(jnp.asarray(std, images.dtype), (images.shape[0],))
    return images + std[:, None, None, None] * jax.random.normal(rng, images.shape, images.dtype)


def noise_augment(images: jax.Array, rng: jax.Array, level: jax.Array | float) -> jax.Array:
    """Conditioning augmentation of cascaded diffusion (Ho et al. 2022): sqrt(1 - g) x + sqrt(g) eps
    with g = level [B] (or a scalar) in [0, 1]; g = 0 leaves x as it is."""
    g = jnp.broadcast_to(jnp.asarray(level, images.dtype), (images.shape[0],))[:, None, None, None]
    return jnp.sqrt(1 - g) * images + jnp.sqrt(g) * jax.random.normal(rng, images.shape, images.dtype)


def _dct_matrix() -> np.ndarray:
    """The orthonormal 8-point DCT-II matrix D [8, 8] (coefficients = D @ x)."""
    n = np.arange(8)
    d = np.cos((2 * n[None, :] + 1) * n[:, None] * np.pi / 16) * np.sqrt(2 / 8)
    d[0] /= np.sqrt(2)
    return d.astype(np.float32)


def quant_tables(quality: jax.Array) -> jax.Array:
    """quality [B] (1..100) -> quantisation tables [B, 3, 8, 8] (Y, Cb, Cr) scaled as libjpeg does:
    s = 5000 / q below 50, else 200 - 2 q; table = clip(floor((T s + 50) / 100), 1, 255)."""
    q = jnp.clip(jnp.asarray(quality, jnp.float32), 1.0, 100.0)
    scale = jnp.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)[:, None, None, None]
    base = jnp.asarray(np.stack([_LUMA, _CHROMA, _CHROMA]))[None]
    return jnp.clip(jnp.floor((base * scale + 50.0) / 100.0), 1.0, 255.0)


def jpeg(images: jax.Array, quality: jax.Array | float, value_range=(-1.0, 1.0)) -> jax.Array:
    """JPEG-like compression [B, H, W, 3] -> [B, H, W, 3], quality [B] or a scalar: pixels (value_range
    -> 0..255) to YCbCr, 8x8 block DCT (sizes padded to multiples of 8 by edge pixels), coefficients
    rounded to multiples of `quant_tables(quality)`, back, clipped to the range. No chroma subsampling."""
    _check(images)
    b, h, w, c = images.shape
    if c != 3:
        raise ValueError(f"degrade: jpeg needs RGB images, got {c} channels")
    lo, hi = _range(value_range, images)
    quality = jnp.broadcast_to(jnp.asarray(quality, jnp.float32), (b,))
    pixels = (images.astype(jnp.float32) - lo) / (hi - lo) * 255.0
    ycc = pixels @ jnp.asarray(_RGB_TO_YCC).T - jnp.array([128.0, 0.0, 0.0])
    ph, pw = -h % 8, -w % 8
    ycc = jnp.pad(ycc, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    hb, wb = (h + ph) // 8, (w + pw) // 8
    blocks = ycc.reshape(b, hb, 8, wb, 8, 3)
    d = jnp.asarray(_dct_matrix())
    coef = jnp.einsum("ui,bhiwjc,vj->bhwcuv", d, blocks, d)  # [B, hb, wb, 3, 8, 8]
    table = quant_tables(quality)[:, None, None]  # [B, 1, 1, 3, 8, 8]
    coef = jnp.round(coef / table) * table
    back = jnp.einsum("ui,bhwcuv,vj->bhiwjc", d, coef, d).reshape(b, h + ph, w + pw, 3)[:, :h, :w]
    rgb = (back + jnp.array([128.0, 0.0, 0.0])) @ jnp.asarray(np.linalg.inv(_RGB_TO_YCC)).T
    out = jnp.clip(rgb, 0.0, 255.0) / 255.0 * (hi - lo) + lo
    return out.astype(images.dtype)


def _uniform(rng: jax.Array, bounds: tuple[float, float], n: int) -> jax.Array:
    lo, hi = (float(v) for v in bounds)
    return jax.random.uniform(rng, (n,), jnp.float32, lo, hi)


def _bsr(images: jax.Array, rng: jax.Array, factor: int, s: Settings) -> jax.Array:
    b = images.shape[0]
    keys = jax.random.split(rng, 8)
    on = jax.random.bernoulli(keys[0], s.prob, (3, b))  # blur, noise, JPEG per example
    sigma = jnp.where(on[0], _uniform(keys[1], s.blur_sigma, b) * factor, 0.0)
    x = blur(images, sigma, blur_radius(float(s.blur_sigma[1]) * factor))
    method = jax.random.randint(keys[2], (b,), 0, len(DOWN_METHODS))
    options = jnp.stack([downsample(x, factor, m) for m in DOWN_METHODS])  # [M, B, h, w, C]
    x = options[method, jnp.arange(b)]
    x = add_noise(x, keys[3], jnp.where(on[1], _uniform(keys[4], s.noise_std, b), 0.0))
    lo, hi = _range(s.value_range, x)
    x = jnp.clip(x, lo, hi)
    x = jnp.where(on[2][:, None, None, None], jpeg(x, _uniform(keys[5], s.jpeg_quality, b), s.value_range), x)
    return jnp.clip(x, lo, hi)


def low_res(images: jax.Array, rng: jax.Array, factor: int, kind: str = "blur",
            settings: Settings = Settings()) -> jax.Array:
    """High-resolution images [B, H, W, C] -> their degraded low-resolution versions [B, H/f, W/f, C]
    by `kind` (module docstring); deterministic given rng."""
    if kind not in KINDS:
        raise ValueError(f"degrade: unknown degradation {kind!r}: choose one of {KINDS}")
    _check(images, factor)
    if kind == "none":
        return downsample(images, factor, "area")
    if kind == "blur":
        low = downsample(images, factor, "area")
        sigma = _uniform(rng, settings.blur_sigma, images.shape[0])
        return blur(low, sigma, blur_radius(float(settings.blur_sigma[1])))
    return _bsr(images, rng, factor, settings)
