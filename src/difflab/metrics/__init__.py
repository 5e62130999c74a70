"""Evaluation: Frechet distance, KID and precision/recall on pluggable features (``features``),
domain classifiers (``classifiers``), and the ODE error against an analytic reference
(``ode_error``)."""

from __future__ import annotations

from typing import Any

import torch

from difflab.metrics.distances import MetricError, frechet_distance, kid, precision_recall
from difflab.registry import Registry

REGISTRY: Registry = Registry("metric")
REGISTRY.add("fd", frechet_distance, "Heusel et al. 2017 (Frechet distance on chosen features)")
REGISTRY.add("kid", kid, "Binkowski et al. 2018, Demystifying MMD GANs (kernel inception distance)")
REGISTRY.add("pr", precision_recall, "Kynkaanniemi et al. 2019, Improved Precision and Recall")

__all__ = ["REGISTRY", "MetricError", "compare", "frechet_distance", "kid", "precision_recall", "table"]


def compare(real: torch.Tensor, fake: torch.Tensor, metrics: tuple[str, ...] = ("fd", "kid", "pr"), *,
            features: str = "pixels", seed: int = 0, **feature_options: Any) -> dict[str, Any]:
    """The named metrics between two image sets (N, C, H, W) in [-1, 1], on the named features."""
    from difflab.metrics import features as feats

    for name in metrics:
        REGISTRY.get(name)
    extractor = feats.get(features, **feature_options)
    real_f, fake_f = feats.extract(extractor, real), feats.extract(extractor, fake)
    out: dict[str, Any] = {"features": features, "feature_dim": real_f.shape[1]}
    for name in metrics:
        out[name] = REGISTRY.get(name)(real_f, fake_f, seed=seed)
    return out


def table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """A markdown table of ``compare`` results (one row each; ``keys`` are leading label columns)."""
    head = [*keys, "FD [95% CI]", "KID ± sd", "precision", "recall", "n real / fake"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.get(k, "")) for k in keys]
        fd, kd, pr = r.get("fd"), r.get("kid"), r.get("pr")
        cells.append(f"{fd['value']:.3g} [{fd['ci'][0]:.3g}, {fd['ci'][1]:.3g}]" if fd else "")
        cells.append(f"{kd['value']:.3g} ± {kd['std']:.2g}" if kd else "")
        cells.append(f"{pr['precision']:.3f}" if pr else "")
        cells.append(f"{pr['recall']:.3f}" if pr else "")
        first = fd or kd or pr
        cells.append(f"{first['n_real']} / {first['n_fake']}" if first else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
