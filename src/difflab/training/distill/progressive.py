"""Progressive distillation (Salimans & Ho 2022): a student step of DDIM that lands where two
teacher DDIM steps land; each round halves the steps and the student becomes the next teacher."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from difflab import predictions, schedules
from difflab.batch import per_sample
from difflab.denoiser import Denoiser
from difflab.processes import Process
from difflab.samplers.base import ddim_coefficients
from difflab.training.distill.teacher import Teacher, ddim_step

Tensor = torch.Tensor


def step_target(x_t: Tensor, z_s: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor,
                sigma_s: Tensor) -> Tensor:
    """The x0 a single DDIM step from (x_t, t) to s must use to land on ``z_s`` (Salimans & Ho 2022,
    Algorithm 2): ``(z_s - (sigma_s / sigma_t) x_t) / (alpha_s - alpha_t sigma_s / sigma_t)``."""
    cx, cd = ddim_coefficients(alpha_t, sigma_t, alpha_s, sigma_s)
    return (z_s - cx * x_t) / cd


@dataclass(frozen=True)
class ProgressiveObjective:
    """The student's x0 estimate at a point of its ``steps``-step ``trailing`` grid regresses onto
    :func:`step_target` of two teacher DDIM steps on the grid of twice as many (which nests it),
    weighted by max(SNR, 1) in x0 space (the paper's truncated-SNR weighting)."""

    teacher: Teacher
    process: Process
    prediction: predictions.Prediction
    steps: int

    def grid(self, steps: int) -> Tensor:
        return schedules.get("trailing", self.process, steps)

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Tensor], **cond: Any) -> Tensor:
        x0, noise = batch["x0"], batch["noise"]
        fine = self.grid(2 * self.steps).to(x0.device)
        i = (batch["seeds"] % self.steps).to(x0.device)
        t, mid, s = fine[2 * i], fine[2 * i + 1], fine[2 * i + 2]
        a_t, s_t = self.teacher.scales(t, x0)
        a_m, s_m = self.teacher.scales(mid, x0)
        a_s, s_s = self.teacher.scales(s, x0)
        x_t = a_t * x0 + s_t * noise
        with torch.no_grad():
            z_mid = ddim_step(x_t, self.teacher(x_t, t.to(x0.dtype), **cond), a_t, s_t, a_m, s_m)
            z_s = ddim_step(z_mid, self.teacher(z_mid, mid.to(x0.dtype), **cond), a_m, s_m, a_s, s_s)
            target = step_target(x_t, z_s, a_t, s_t, a_s, s_s)
        student = Denoiser(net, self.process, self.prediction)(x_t, t.to(x0.dtype), **cond)
        weight = per_sample(((a_t / s_t) ** 2).flatten(1)[:, 0].clamp(min=1.0), x0).flatten(1)[:, 0]
        return (weight * (student - target).float().pow(2).flatten(1).mean(1)).mean()
