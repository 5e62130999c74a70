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


@torch.no_grad()
def straightness(denoiser: Any, noise: Tensor, *, steps: int = 32, cond: dict[str, Any] | None = None) -> float:
    """How far a flow model's ODE paths are from straight lines (Liu et al. 2023, Flow Straight and
    Fast, Eq. 4): ``mean over t of E ||(x_1 - x_0) - v(x_t, t)||^2`` per dimension, along the
    model's own Euler path from ``noise`` at t = 1 over a uniform grid of ``steps`` (in the path
    variable sigma(t), which is t for an unshifted flow). 0 means one Euler
    step is exact; reflow lowers it. The model's process must be rectified flow (``v = dx/dt``)."""
    from difflab.processes import Flow

    process = denoiser.process
    if not isinstance(process, Flow):
        raise ValueError(f"straightness is defined for rectified-flow models; this one's process is {process!r}")
    cond = cond or {}
    ts = torch.linspace(process.t_max, 0.0, steps + 1, dtype=torch.float64)
    levels = process.sigma(ts).tolist()  # the flow's path variable (t itself unless it is shifted)
    x, velocities = noise * levels[0], []
    start = x
    for i in range(steps):
        v = denoiser.velocity(x, float(ts[i]), **cond)
        velocities.append(v)
        x = x + (levels[i + 1] - levels[i]) * v
    chord = start - x
    return float(torch.stack([(chord - v).pow(2).flatten(1).mean(1) for v in velocities]).mean())
