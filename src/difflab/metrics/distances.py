"""Distances between sets of features: Frechet distance, KID and precision/recall, each with a
confidence interval and the sample counts it used.

All work in float64 on the CPU; features are ``(N, D)`` tensors or arrays.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

Array = np.ndarray


class MetricError(ValueError):
    """A metric cannot be computed from what it was given (too few samples, mismatched features)."""


def _as_array(features: Any, name: str) -> Array:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise MetricError(f"{name} features must be (N, D), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise MetricError(f"{name} features contain NaN or inf; check the images (a diverged sampler?)")
    return arr


def _pair(real: Any, fake: Any, metric: str, minimum: int) -> tuple[Array, Array]:
    a, b = _as_array(real, "real"), _as_array(fake, "fake")
    if a.shape[1] != b.shape[1]:
        raise MetricError(f"{metric}: real features have {a.shape[1]} dimensions, fake {b.shape[1]}; "
                          "extract both with the same feature extractor")
    for name, arr in (("real", a), ("fake", b)):
        if len(arr) < minimum:
            raise MetricError(f"{metric} needs at least {minimum} {name} samples, got {len(arr)}; "
                              "generate or load more")
    return a, b


def gaussian_frechet(mu1: Array, cov1: Array, mu2: Array, cov2: Array) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2):
    ``|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2))`` (Dowson & Landau 1982).

    ``tr (cov1 cov2)^(1/2)`` is the sum of the square roots of the eigenvalues of ``cov1 cov2``
    (real and non-negative for covariance matrices), which avoids an ill-conditioned ``sqrtm``.
    """
    eig = np.linalg.eigvals(cov1 @ cov2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


def _fd(a: Array, b: Array) -> float:
    return gaussian_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _interval(values: Array, level: float) -> list[float]:
    lo = (1 - level) / 2
    return [float(np.quantile(values, lo)), float(np.quantile(values, 1 - lo))]


def frechet_distance(real: Any, fake: Any, *, bootstrap: int = 50, level: float = 0.95, seed: int = 0
                     ) -> dict[str, Any]:
    """FD between Gaussians fitted to two feature sets (FID with Inception features; Heusel et al.
    2017). FD is biased upward at finite N, and resampling with replacement (duplicates) adds to the
    bias, so the interval is the bootstrap's percentile spread around its median, re-centred on the
    estimate (both sets resampled ``bootstrap`` times); the bootstrap's own bias is reported beside."""
    a, b = _pair(real, fake, "Frechet distance", 2)
    if min(len(a), len(b)) <= a.shape[1]:
        warnings.warn(f"Frechet distance from {min(len(a), len(b))} samples of {a.shape[1]}-dimensional features: "
                      "the covariance is singular and the value biased; use more samples", stacklevel=2)
    value = _fd(a, b)
    out = {"value": value, "ci": None, "ci_level": level, "n_real": len(a), "n_fake": len(b)}
    if bootstrap:
        rng = np.random.default_rng(seed)
        boots = np.array([_fd(a[rng.integers(len(a), size=len(a))], b[rng.integers(len(b), size=len(b))])
                          for _ in range(bootstrap)])
        lo, hi = _interval(boots, level)
        centre = float(np.median(boots))
        out.update(ci=[max(0.0, value - (centre - lo)), value + (hi - centre)],
                   bootstrap_bias=float(centre - value),
                   ci_method=f"bootstrap percentiles about the median, re-centred on the estimate; {bootstrap} "
                             "resamples of both sets")
    return out


def _polynomial_mmd2(x: Array, y: Array) -> float:
    """Unbiased MMD^2 with the kernel ``(x.y / d + 1)^3`` (Binkowski et al. 2018)."""
    d, m, n = x.shape[1], len(x), len(y)
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(real: Any, fake: Any, *, subsets: int = 100, subset_size: int = 1000, level: float = 0.95, seed: int = 0
        ) -> dict[str, Any]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased polynomial-kernel MMD^2,
    averaged over ``subsets`` random subsets of ``min(subset_size, N)`` samples of each set. Its
    expectation is 0 when both sets come from one distribution. The interval is the spread of the
    per-subset estimates (conservative for their mean)."""
    a, b = _pair(real, fake, "KID", 2)
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = np.array([_polynomial_mmd2(a[rng.choice(len(a), m, replace=False)],
                                        b[rng.choice(len(b), m, replace=False)]) for _ in range(subsets)])
    return {"value": float(values.mean()), "std": float(values.std()), "ci": _interval(values, level),
            "ci_level": level, "ci_method": f"quantiles of {subsets} subset estimates of {m} samples each",
            "n_real": len(a), "n_fake": len(b)}


_ROWS = 1024  # rows of a distance matrix held at once


def _knn_radii(x: Array, k: int) -> Array:
    """Distance of each point to its k-th nearest neighbour within the set (itself excluded)."""
    return np.concatenate([np.partition(_pairwise(x[i: i + _ROWS], x), k, axis=1)[:, k]  # column 0: itself
                           for i in range(0, len(x), _ROWS)])


def _pairwise(x: Array, y: Array) -> Array:
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.sqrt(np.clip(sq, 0, None))


def _in_manifold(points: Array, support: Array, radii: Array) -> Array:
    """For each point: does it lie within the k-NN ball of some support point?"""
    return np.concatenate([(_pairwise(points[i: i + _ROWS], support) <= radii[None, :]).any(1)
                           for i in range(0, len(points), _ROWS)])


def precision_recall(real: Any, fake: Any, *, k: int = 3, bootstrap: int = 200, level: float = 0.95, seed: int = 0
                     ) -> dict[str, Any]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the fraction of fake
    samples inside the real manifold (union of k-NN balls), recall the fraction of real samples
    inside the fake manifold. The intervals bootstrap the per-sample indicators with the manifolds
    fixed."""
    a, b = _pair(real, fake, "precision/recall", k + 1)
    inside_real = _in_manifold(b, a, _knn_radii(a, k))
    inside_fake = _in_manifold(a, b, _knn_radii(b, k))
    rng = np.random.default_rng(seed)

    def boot(ind: Array) -> list[float] | None:
        if not bootstrap:
            return None
        return _interval(np.array([ind[rng.integers(len(ind), size=len(ind))].mean() for _ in range(bootstrap)]), level)

    return {"precision": float(inside_real.mean()), "recall": float(inside_fake.mean()),
            "precision_ci": boot(inside_real), "recall_ci": boot(inside_fake), "ci_level": level, "k": k,
            "ci_method": f"bootstrap of per-sample indicators, {bootstrap} resamples",
            "n_real": len(a), "n_fake": len(b)}


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, *, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point sets (Bonneel et al. 2015)."""
    if a.shape != b.shape:
        raise ValueError(f"point sets must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a.double().reshape(a.shape[0], -1)
    b = b.double().reshape(b.shape[0], -1)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, _ = (a @ dirs).sort(0)
    pb, _ = (b @ dirs).sort(0)
    return float(((pa - pb) ** 2).mean().sqrt())
