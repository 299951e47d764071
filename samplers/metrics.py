"""Sample-quality metrics for samplers checked against known distributions (tests, bench/).

``frechet_distance(x, y)`` is the Frechet (2-Wasserstein squared) distance between the
Gaussians with the sample means and covariances of two sample sets: on the exact-score
Gaussian test bed it measures how far a sampler's output is from the data, and two
independent true sample sets of the same size give its noise floor.

Plain numpy in float64; imported as ``samplers.metrics`` (not re-exported by the package).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["flat_float64", "sample_moments", "frechet_from_moments", "frechet_distance"]


def flat_float64(x) -> np.ndarray:
    """Samples (B, ...) (tensor or array) as a float64 numpy array (B, D)."""
    if torch.is_tensor(x):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def _as_array(v) -> np.ndarray:
    if torch.is_tensor(v):
        v = v.detach().to("cpu", torch.float64).numpy()
    return np.asarray(v, dtype=np.float64)


def sample_moments(x) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean (D,) and unbiased sample covariance (D, D), float64, of x (B, ...)."""
    x = flat_float64(x)
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh, negative round-off eigenvalues clamped to 0."""
    vals, vecs = np.linalg.eigh(0.5 * (a + a.T))
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_from_moments(mu1, cov1, mu2, cov2) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2):

        |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^{1/2} cov2 cov1^{1/2})^{1/2}),

    in float64. The matrix square roots are symmetric eigen-decompositions, so the result
    is real and >= 0 (up to round-off) even for singular or badly conditioned covariances,
    unlike sqrtm(cov1 @ cov2). mu: (D,), cov: (D, D); tensors or arrays.
    """
    mu1, mu2 = _as_array(mu1).reshape(-1), _as_array(mu2).reshape(-1)
    cov1, cov2 = np.atleast_2d(_as_array(cov1)), np.atleast_2d(_as_array(cov2))
    root1 = _sym_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    vals = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    cross = np.sqrt(np.clip(vals, 0.0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * cross)


def frechet_distance(x, y) -> float:
    """Gaussian Frechet distance between two sample sets x (B1, ...) and y (B2, ...) of the
    same event size D (flattened): ``frechet_from_moments`` of their sample moments."""
    mu1, cov1 = sample_moments(x)
    mu2, cov2 = sample_moments(y)
    return frechet_from_moments(mu1, cov1, mu2, cov2)
