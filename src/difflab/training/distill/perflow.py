"""Piecewise rectified flow (PeRFlow: Yan et al. 2024): split time into windows and, in each, straighten
the teacher's ODE between the window's ends, so one Euler step per window follows the teacher. The
window's start is a forward-process sample of the data, its end the teacher's ODE solution from it,
so no pairs are stored and any data set works."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from difflab import predictions
from difflab.batch import per_sample
from difflab.denoiser import Denoiser
from difflab.processes import Flow, Process
from difflab.training.distill.teacher import Teacher

Tensor = torch.Tensor


@dataclass(frozen=True)
class PiecewiseReflowObjective:
    """Window k of ``windows`` spans t in [k / K, (k + 1) / K]. The student's velocity at a point of
    the straight line between the window's ends regresses onto that line's slope; the end is the
    teacher's ``solver`` ODE in ``solver_steps`` steps from the start."""

    teacher: Teacher
    process: Process
    prediction: predictions.Prediction
    windows: int = 4
    solver_steps: int = 4
    solver: str = "heun"

    def __post_init__(self) -> None:
        if not isinstance(self.process, Flow) or self.process.shift != 1.0:
            raise ValueError(f"piecewise reflow straightens rectified flow (shift 1); the process is {self.process!r}")
        if self.windows < 1 or self.solver_steps < 1:
            raise ValueError(f"windows and solver_steps must be >= 1, got {self.windows}, {self.solver_steps}")

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Tensor], **cond: Any) -> Tensor:
        x0, noise, seeds = batch["x0"], batch["noise"], batch["seeds"]
        k = (seeds % self.windows).to(x0.device, x0.dtype)
        high, low = (k + 1) / self.windows * self.process.t_max, k / self.windows * self.process.t_max
        alpha, sigma = self.teacher.scales(high, x0)
        x_high = alpha * x0 + sigma * noise
        with torch.no_grad():
            x = x_high
            for i in range(self.solver_steps):  # the teacher's ODE across the window
                t = high + (low - high) * i / self.solver_steps
                s = high + (low - high) * (i + 1) / self.solver_steps
                x = self.teacher.step(x, t, s, self.solver, **cond)
            x_low = x
        u = ((seeds // self.windows) % 4096).to(x0.device, x0.dtype) / 4095
        t = low + u * (high - low)
        x_t = x_low + per_sample(u, x0) * (x_high - x_low)
        slope = (x_high - x_low) / per_sample(high - low, x0)
        velocity = Denoiser(net, self.process, self.prediction).velocity(x_t, t, **cond)
        return (velocity - slope).float().pow(2).flatten(1).mean(1).mean()
