"""Error of sampled end points against the exact probability-flow ODE solution from the same start
(analytic mixtures only): the metric for sampler accuracy that needs no proxy."""

from __future__ import annotations

import math
from typing import Any

import torch

Tensor = torch.Tensor


def endpoint_error(samples: Tensor, reference: Tensor) -> dict[str, Any]:
    """RMSE, median and maximum per-sample RMSE of ``samples`` against known end points (NaN when any
    sample is not finite). The reference of a sampler run is ``mixture.ode_solve(x_start, process,
    t_start)`` (DOP853 at rtol 1e-10, float64) from the state it started at."""
    diff = (samples.double().cpu() - reference.double().cpu()).flatten(1)
    per_sample = diff.pow(2).mean(1).sqrt()
    rmse = float(diff.pow(2).mean().sqrt())
    finite = math.isfinite(rmse)
    return {"rmse": rmse if finite else float("nan"),
            "median": float(per_sample.median()) if finite else float("nan"),
            "max": float(per_sample.max()) if finite else float("nan"), "n": len(samples)}
