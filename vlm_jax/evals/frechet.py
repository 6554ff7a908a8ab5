"""The Fréchet distance between two sets of features, as FID computes it (Heusel et al. 2017).

    d^2 = ||mu_a - mu_b||^2 + tr(C_a) + tr(C_b) - 2 tr(sqrt(C_a C_b))

with each set summarised by its mean and unbiased covariance (divisor N - 1), in float64, and
sqrt(C_a C_b) the principal matrix square root of the product (scipy.linalg.sqrtm). This is the
arithmetic of pytorch-fid's calculate_frechet_distance and clean-fid's frechet_distance: when the
product is too singular for a finite root, eps is added to both diagonals and the root taken
again; the tiny imaginary part rounding leaves is dropped (an imaginary part above 1e-3 on the
diagonal is an error, as there). vlm_jax.evals.generation reports it on CLIP image embeddings
(`gen/fd_clip`).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from scipy import linalg

log = logging.getLogger(__name__)

EPS = 1e-6  # added to both covariance diagonals when the product has no finite square root


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] (N >= 2) -> (mean float64 [D], unbiased covariance float64 [D, D])."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected features [N, D], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature rows, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("features hold non-finite values")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray,
                                eps: float = EPS) -> float:
    """The Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b): means [D], covariances
    [D, D] (float64) -> float."""
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape} / {cov_a.shape} against {mu_b.shape} / {cov_b.shape}")
    diff = mu_a - mu_b
    with warnings.catch_warnings():  # singular products are common (fewer samples than dimensions):
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # quiet, as the references' disp=False
        root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        log.warning("frechet_distance: singular covariance product; adding %g to both diagonals", eps)
        offset = np.eye(cov_a.shape[0]) * eps
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0.0, atol=1e-3):
            raise ValueError(f"frechet_distance: square root with imaginary part {np.abs(root.imag).max():.3g}")
        root = root.real
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between features_a [N, D] and features_b [M, D] (N, M >= 2), each set
    summarised by its mean and unbiased covariance in float64 -> float (>= 0 up to rounding)."""
    mu_a, cov_a = gaussian_stats(features_a)
    mu_b, cov_b = gaussian_stats(features_b)
    return frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b)
