"""Shortcut models (Frans et al. 2024, One Step Diffusion via Shortcut Models): one network
conditioned on the step size d, trained with flow matching at d = 0 and self-consistency — one step
of size 2d equals two steps of size d — so it samples with any power-of-two number of Euler steps."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from difflab import predictions
from difflab.batch import per_sample
from difflab.denoiser import Denoiser
from difflab.processes import Flow, Process
from difflab.training.losses import diffusion_loss

Tensor = torch.Tensor


def split(cond: dict[str, Any], rows: slice) -> dict[str, Any]:
    return {k: v[rows] for k, v in cond.items()}


@dataclass(frozen=True)
class ShortcutObjective:
    """The first ``consistency_fraction`` of each batch learns ``v(x_t, t, 2d) = (v(x_t, t, d) +
    v(x_t - d v, t - d, d)) / 2`` (targets without gradient; at the smallest d the two queries use
    d = 0), with 2d in {2/M, ..., 1} and t a multiple of 2d; the rest is plain flow matching at
    d = 0. ``M = max_steps``: the finest step the model takes."""

    process: Process
    prediction: predictions.Prediction
    max_steps: int = 128
    consistency_fraction: float = 0.25

    def __post_init__(self) -> None:
        if not isinstance(self.process, Flow) or self.process.shift != 1.0:
            raise ValueError(f"shortcut models take straight Euler steps in t on rectified flow (shift 1); "
                             f"the process is {self.process!r}")
        if self.max_steps < 2 or self.max_steps & (self.max_steps - 1):
            raise ValueError(f"max_steps must be a power of two >= 2, got {self.max_steps}")

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Tensor], **cond: Any) -> Tensor:
        x0, noise, seeds = batch["x0"], batch["noise"], batch["seeds"]
        b = x0.shape[0]
        k = max(1, round(b * self.consistency_fraction)) if b > 1 else 0
        flow_part = diffusion_loss(net, x0[k:], self.process, self.prediction, t=batch["t"][k:], noise=noise[k:],
                                   step_size=torch.zeros(b - k, device=x0.device), **split(cond, slice(k, None)))
        if k == 0:
            return flow_part.mean()
        levels = int(math.log2(self.max_steps))
        level = (seeds[:k] % levels + 1).to(x0.device)  # the big step 2d = 2^level / M
        big = (2.0 ** level / self.max_steps).to(x0.dtype)
        count = (1.0 / big).round()
        t = big * ((seeds[:k] // levels).to(x0.device) % count + 1)
        d = big / 2
        query = torch.where(level == 1, torch.zeros_like(d), d)
        den = Denoiser(net, self.process, self.prediction)
        c = split(cond, slice(0, k))
        _, alpha, sigma = den.scales(x0[:k], t)
        x_t = alpha * x0[:k] + sigma * noise[:k]
        with torch.no_grad():
            v1 = den.velocity(x_t, t, step_size=query, **c)
            v2 = den.velocity(x_t - per_sample(d, x_t) * v1, t - d, step_size=query, **c)
            target = 0.5 * (v1 + v2)
        pred = den.velocity(x_t, t, step_size=big, **c)
        consistency = (pred - target).float().pow(2).flatten(1).mean(1)
        return (flow_part.sum() + consistency.sum()) / b
