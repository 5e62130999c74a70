"""Consistency distillation and consistency training (Song et al. 2023; improved training, Song &
Dhariwal 2023; easy consistency tuning, Geng et al. 2024; latent consistency models' guidance
embedding and skipping steps, Luo et al. 2023): the student's x0 estimate is made the
same at neighbouring points of one ODE path, so one evaluation jumps from noise to data.

The boundary condition f(x, 0) = x needs no special parameterisation here: every prediction but x0
gives ``D(x, 0) = x`` exactly (sigma(0) = 0), the way EDM's c_skip / c_out do. The target network is
the student itself without gradient (iCT), so the objective keeps no state and resume stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from difflab import predictions, schedules
from difflab.denoiser import Denoiser
from difflab.processes import Process
from difflab.training.distill.teacher import Teacher

Tensor = torch.Tensor


def curriculum(step: int, total: int, start: int, end: int) -> int:
    """The discretisation N at training ``step``: ``start`` doubling in equal stages up to ``end``
    (iCT's exponential schedule, Song & Dhariwal 2023, Sec. 3.4)."""
    if start >= end:
        return end
    stages = math.floor(math.log2(end / start)) + 1
    stage = min(stages - 1, step * stages // max(1, total))
    return min(end, start * 2**stage)


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """Per sample ``sqrt(||a - b||^2 + c^2) - c`` (Song & Dhariwal 2023), c = 0.00054 sqrt(dim) by
    default; c = 0 is the L2 distance."""
    diff = (a - b).float().flatten(1)
    c = 0.00054 * math.sqrt(diff.shape[1]) if c is None else c
    return (diff.pow(2).sum(1) + c * c).sqrt() - c


@dataclass(frozen=True)
class ConsistencyObjective:
    """``d(D(x_hi, t_hi), sg D(x_lo, t_lo)) / (t_hi - t_lo)`` for neighbours on the ``schedule``'s
    grid of N steps (N from the curriculum). ``teacher`` given: x_lo is the teacher's ODE step from
    x_hi (distillation); None: x_lo is the same data and noise at t_lo (training). ``skip``: the
    teacher steps over that many grid points at once (LCM's skipping-step solver, Luo et al. 2023);
    ``guidance_range``: each sample's teacher is guided with a scale drawn from it, which the student
    gets as its ``guidance_scale`` input (a latent consistency model that carries CFG)."""

    process: Process
    prediction: predictions.Prediction
    teacher: Teacher | None
    total_steps: int
    schedule: str = "karras"
    steps_start: int = 10
    steps_end: int = 80
    solver: str = "heun"
    huber_c: float | None = None
    skip: int = 1
    guidance_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.prediction.name == "x0":
            raise ValueError("consistency models need D(x, 0) = x, which an x0-prediction network does not give; "
                             "use a teacher (student) with eps, v, flow or edm prediction")
        if self.skip < 1:
            raise ValueError(f"skip must be >= 1 (grid points per teacher step), got {self.skip}")
        if self.guidance_range is not None and (self.teacher is None or not 1 <= self.guidance_range[0]
                                                <= self.guidance_range[1]):
            raise ValueError("guidance_range = [w_min, w_max] with 1 <= w_min <= w_max needs a teacher to guide, "
                             f"got {self.guidance_range}")
        if not 1 <= self.steps_start <= self.steps_end:
            raise ValueError(f"the curriculum needs 1 <= steps_start <= steps_end, got {self.steps_start}, "
                             f"{self.steps_end}")

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Tensor], **cond: Any) -> Tensor:
        x0, noise = batch["x0"], batch["noise"]
        n_steps = curriculum(int(batch["step"][0]), self.total_steps, self.steps_start, self.steps_end)
        grid = schedules.get(self.schedule, self.process, n_steps).to(x0.device)
        n = (batch["seeds"] % n_steps).to(x0.device)
        t_hi, t_lo = grid[n].to(x0.dtype), grid[(n + self.skip).clamp(max=n_steps)].to(x0.dtype)
        scale = None
        if self.guidance_range is not None:  # LCM: a guidance scale per sample, which the student is told
            low, high = self.guidance_range
            u = ((batch["seeds"] // n_steps) % 1024).to(x0.device, x0.dtype) / 1023
            scale = low + (high - low) * u
            cond = {**cond, "guidance_scale": scale}
        den = Denoiser(net, self.process, self.prediction)
        _, a_hi, s_hi = den.scales(x0, t_hi)
        x_hi = a_hi * x0 + s_hi * noise
        with torch.no_grad():
            if self.teacher is not None:
                teacher_cond = {k: v for k, v in cond.items() if k != "guidance_scale"}
                x_lo = self.teacher.step(x_hi, t_hi, t_lo, self.solver, scale, **teacher_cond)
            else:
                _, a_lo, s_lo = den.scales(x0, t_lo)
                x_lo = a_lo * x0 + s_lo * noise
            target = den(x_lo, t_lo, **cond)
        distance = pseudo_huber(den(x_hi, t_hi, **cond), target, self.huber_c)
        return (distance / (t_hi - t_lo).float()).mean()
