"""Distribution matching distillation, improved (DMD2: Yin et al. 2024): a few-step generator
pulled toward the teacher's distribution by the difference of two denoisers — the teacher's
("real") and a "fake" one trained all along on the generator's own samples — with the fake network
updated several times per generator step (two time-scale updates) and, for a multi-step student,
backward simulation: the generator learns on inputs from its own earlier steps.

The fake network and its optimizer are the objective's auxiliary state: the trainer checkpoints
and restores them (:meth:`DMDObjective.auxiliary`), so resume stays exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from difflab import predictions, schedules
from difflab.batch import per_sample
from difflab.denoiser import Denoiser
from difflab.processes import Process
from difflab.training.distill.teacher import Teacher
from difflab.training.losses import diffusion_loss
from difflab.training.optim import adamw

Tensor = torch.Tensor


class DMDObjective:
    """The generator loss ``0.5 mean (x_g - sg(x_g - (D_fake - D_real) / w))^2`` at a random t
    (w = mean |x_g - D_real|, DMD's normalisation), after ``fake_updates`` diffusion-loss steps of
    the fake network on the generator's samples. ``steps``: the student's sampling steps (its
    ``trailing`` grid); with more than one, each sample's generator input is the student's own
    rollout to a random grid point (backward simulation)."""

    def __init__(self, teacher: Teacher, process: Process, prediction: predictions.Prediction, fake: nn.Module, *,
                 steps: int = 1, fake_updates: int = 5, fake_lr: float = 1e-4,
                 t_range: tuple[float, float] = (0.02, 0.98)):
        if steps < 1 or fake_updates < 1:
            raise ValueError(f"steps and fake_updates must be >= 1, got {steps}, {fake_updates}")
        self.teacher, self.process, self.prediction = teacher, process, prediction
        self.fake, self.steps, self.fake_updates, self.t_range = fake, steps, fake_updates, t_range
        self.fake.train().requires_grad_(True)
        self.fake_optimizer = adamw(list(self.fake.parameters()), fake_lr)

    def auxiliary(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        """What the trainer checkpoints beside the student: the fake network and its optimizer."""
        return {"fake": (self.fake, self.fake_optimizer)}

    def _inputs(self, den: Denoiser, noise: Tensor, seeds: Tensor, cond: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Each sample's generator input and time: pure noise at t_max, or (backward simulation) the
        student's own rollout, without gradient, to grid point j of its ``steps``."""
        grid = schedules.get("trailing", self.process, self.steps).to(noise.device)
        x = float(self.process.sigma(grid[:1]).item()) * noise
        if self.steps == 1:
            return x, grid[0].expand(len(x)).to(noise.dtype)
        j = (seeds % self.steps).to(noise.device)
        g = torch.Generator(device="cpu").manual_seed(int(seeds[0]) % (2**62))
        state = x
        with torch.no_grad():
            for i in range(1, self.steps):  # the multistep consistency rollout: denoise, noise afresh
                x0 = den(state, grid[i - 1].to(noise.dtype), **cond)
                fresh = torch.randn(x0.shape, generator=g).to(x0)
                renoised = float(self.process.alpha(grid[i:i + 1]).item()) * x0 + \
                    float(self.process.sigma(grid[i:i + 1]).item()) * fresh
                state = torch.where(per_sample(j >= i, x0), renoised, state)
        return state, grid[j].to(noise.dtype)

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Tensor], **cond: Any) -> Tensor:
        noise, seeds = batch["noise"], batch["seeds"]
        den = Denoiser(net, self.process, self.prediction)
        x_in, t_in = self._inputs(den, noise, seeds, cond)
        x_g = den(x_in, t_in, **cond)
        g = torch.Generator(device="cpu").manual_seed(int(seeds[-1]) % (2**62))
        low, high = self.t_range
        fake = Denoiser(self.fake, self.process, self.prediction)
        with torch.enable_grad():  # the fake network follows the generator (two time-scale updates)
            for _ in range(self.fake_updates):
                t = (low + (high - low) * torch.rand(len(x_g), generator=g)).to(x_g.device)
                eps = torch.randn(x_g.shape, generator=g).to(x_g)
                loss = diffusion_loss(self.fake, x_g.detach(), self.process, self.prediction, t=t, noise=eps,
                                      **cond).mean()
                self.fake_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.fake.parameters(), 1.0)
                self.fake_optimizer.step()
        t = (low + (high - low) * torch.rand(len(x_g), generator=g)).to(x_g.device, x_g.dtype)
        eps = torch.randn(x_g.shape, generator=g).to(x_g)
        _, alpha, sigma = den.scales(x_g, t)
        with torch.no_grad():
            x_t = alpha * x_g.detach() + sigma * eps
            real = self.teacher(x_t, t, **cond)
            fake_x0 = fake(x_t, t, **cond)
            weight = (x_g.detach() - real).abs().flatten(1).mean(1).clamp(min=1e-5)
            gradient = (fake_x0 - real) / per_sample(weight, x_g)
            target = x_g.detach() - gradient
        return 0.5 * (x_g - target).float().pow(2).mean()
