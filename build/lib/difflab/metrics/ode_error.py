"""Error of sampled end points against the exact probability-flow ODE solution from the same start
(analytic mixtures only): the metric for sampler accuracy that needs no proxy."""

from __future__ import annotations

import math
from typing import Any

import torch

from difflab.analytic import GaussianMixture
from difflab.processes import Process

Tensor = torch.Tensor


def ode_error(samples: Tensor, mixture: GaussianMixture, process: Process, x_start: Tensor, t_start: float = 1.0,
              *, labels: Tensor | None = None) -> dict[str, Any]:
    """RMSE, median and maximum per-sample RMSE of ``samples`` against ``mixture.ode_solve(x_start)``.

    ``x_start`` is the state the sampler started from at ``t_start`` (``sigma(t_start) * noise`` for
    ``difflab.sample``). The reference is solved with DOP853 at rtol 1e-10 in float64.
    """
    if samples.shape != x_start.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and x_start {tuple(x_start.shape)} must have one shape")
    return endpoint_error(samples, mixture.ode_solve(x_start.double(), process, t_start, labels=labels))


def endpoint_error(samples: Tensor, reference: Tensor) -> dict[str, Any]:
    """RMSE, median and maximum per-sample RMSE of ``samples`` against known end points (NaN when any
    sample is not finite)."""
    diff = (samples.double().cpu() - reference.double().cpu()).flatten(1)
    per_sample = diff.pow(2).mean(1).sqrt()
    rmse = float(diff.pow(2).mean().sqrt())
    finite = math.isfinite(rmse)
    return {"rmse": rmse if finite else float("nan"),
            "median": float(per_sample.median()) if finite else float("nan"),
            "max": float(per_sample.max()) if finite else float("nan"), "n": len(samples)}
