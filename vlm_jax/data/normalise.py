"""Pixel normalisation of the data pipeline, both ways: uint8 images <-> the float32 the models read.

    normalised = (uint8 / 255 - mean) / std        (config.data.mean / std, per channel, 0..1 units)

`denormalise` is its inverse for images a model draws (text-to-image): rounded and clipped to uint8.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _norm_constants(config: Any) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) float32 [3] so that normalised = uint8 * scale + offset."""
    mean = np.asarray(config.data.mean, np.float32).reshape(-1)
    std = np.asarray(config.data.std, np.float32).reshape(-1)
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def normalise(images: np.ndarray, config: Any) -> np.ndarray:
    """uint8 [N,S,S,3] -> float32 [N,S,S,3] = (x / 255 - mean) / std (mean/std in 0..1 units)."""
    scale, offset = _norm_constants(config)
    out = images.astype(np.float32)
    out *= scale
    out += offset
    return out


def denormalise(images: Any, config: Any) -> np.ndarray:
    """float32 [..., 3] in normalise's units -> uint8 [..., 3]: (x * std + mean) * 255, rounded to
    the nearest integer and clipped to 0..255 (a generator may draw outside the range). NaN is an
    error: it has no pixel value."""
    images = np.asarray(images, np.float32)
    if images.ndim < 1 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images [..., 3], got shape {images.shape}")
    if np.isnan(images).any():
        raise ValueError("images hold NaN values")
    scale, offset = _norm_constants(config)
    pixels = (images - offset) / scale
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
