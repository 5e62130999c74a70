"""Latent adversarial diffusion distillation (LADD: Sauer et al. 2024, "Fast High-Resolution Image
Synthesis with Latent Adversarial Diffusion Distillation"): a few-step student trained only by a
discriminator that works on the frozen teacher's own features. Generated and data samples are
noised to the same random time (logit-normal, LADD's noise-level sampling), passed through the
teacher network, and small heads on several of its blocks tell them apart with the hinge loss; the
student gets the heads' generator loss through the frozen teacher. No pixel-space or external
discriminator, no teacher ODE: the teacher is a feature extractor.

A multi-step student learns as in ADD / LADD: its input at grid point j of its ``trailing`` steps is
a data sample noised to that point (pure noise at the first), and it samples with the consistency
sampler (denoise, re-noise to the next point). The heads and their optimizer are the objective's
auxiliary state (:meth:`LADDObjective.auxiliary`), so resume stays exact.
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
from difflab.training.distill.dmd import GANHead, capturing
from difflab.training.optim import adamw

Tensor = torch.Tensor


class LADDObjective:
    """The student's loss ``-sum_b mean head_b(F_b(x_t))`` where ``F_b`` are the frozen ``features``
    network's block outputs on the student's sample noised to t (t = sigmoid(N(t_mean, t_std^2)),
    clipped to ``t_range``); before it, each head takes one step of the hinge loss
    ``relu(1 - head(F(noised data))) + relu(1 + head(F(noised sample)))`` at ``head_lr``. ``heads``:
    one :class:`~difflab.training.distill.dmd.GANHead` per feature block. ``steps``: the student's
    sampling steps."""

    #: the loss is the generator's side of a game: the trainer's divergence guard watches only gradients
    adversarial = True

    def __init__(self, features: nn.Module, process: Process, prediction: predictions.Prediction,
                 heads: list[GANHead], *, steps: int = 1, head_lr: float = 2e-4, t_mean: float = 0.0,
                 t_std: float = 1.0, t_range: tuple[float, float] = (0.02, 0.98)):
        if steps < 1 or not heads:
            raise ValueError(f"LADD needs steps >= 1 and at least one head, got steps={steps}, {len(heads)} heads")
        order = features.block_names()
        self.heads = nn.ModuleList(sorted(heads, key=lambda head: order.index(head.block)))  # the order blocks run
        self.features, self.process, self.prediction, self.steps = features, process, prediction, steps
        self.features.eval().requires_grad_(False)
        self.blocks = [head.block for head in self.heads]
        self._features_denoiser = Denoiser(features, process, prediction)  # for the network's inputs at (x_t, t)
        self.t_mean, self.t_std, self.t_range = float(t_mean), float(t_std), t_range
        self.head_optimizer = adamw(list(self.heads.parameters()), head_lr)

    def auxiliary(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        """What the trainer checkpoints beside the student: the heads and their optimizer."""
        return {"ladd_heads": (self.heads, self.head_optimizer)}

    def logits(self, x_t: Tensor, t: Tensor, **cond: Any) -> list[Tensor]:
        """Each head's logits on the features network's blocks for the noised input ``x_t`` at ``t``."""
        return [head(feature) for head, feature in zip(self.heads, self._features(x_t, t, cond), strict=True)]

    def _features(self, x_t: Tensor, t: Tensor, cond: dict[str, Any]) -> list[Tensor]:
        seen: list[Tensor] = []
        x_in, t_in = self._features_denoiser.network_inputs(x_t, t)
        capturing(self.features, self.blocks, seen)(x_in, t_in, **cond)
        return seen

    def _inputs(self, den: Denoiser, data: Tensor, noise: Tensor, seeds: Tensor) -> tuple[Tensor, Tensor]:
        """Each sample's student input and time: pure noise at t_max, or data noised to grid point j."""
        grid = schedules.get("trailing", self.process, self.steps).to(noise.device)
        j = (seeds % self.steps).to(noise.device)
        t, alpha, sigma = den.scales(noise, grid[j].to(noise.dtype))
        start = float(self.process.sigma(grid[:1]).item()) * noise
        return torch.where(per_sample(j == 0, noise), start, alpha * data + sigma * noise), t

    def _times(self, n: int, g: torch.Generator, like: Tensor) -> Tensor:
        low, high = self.t_range
        t = torch.sigmoid(self.t_mean + self.t_std * torch.randn(n, generator=g)).clamp(low, high)
        return t.to(like.device, like.dtype)

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Tensor], **cond: Any) -> Tensor:
        data, noise, seeds = batch["x0"], batch["noise"], batch["seeds"]
        den = Denoiser(net, self.process, self.prediction)
        x_g = den(*self._inputs(den, data, noise, seeds), **cond)
        g = torch.Generator(device="cpu").manual_seed(int(seeds[-1]) % (2**62))
        t = self._times(len(x_g), g, x_g)
        eps_fake, eps_real = (torch.randn(x_g.shape, generator=g).to(x_g) for _ in range(2))
        _, alpha, sigma = den.scales(x_g, t)
        with torch.enable_grad():  # the heads' hinge step on noised data (real) and noised samples (fake)
            with torch.no_grad():
                real_features = self._features(alpha * data + sigma * eps_real, t, cond)
                fake_features = self._features(alpha * x_g.detach() + sigma * eps_fake, t, cond)
            relu = nn.functional.relu
            loss = sum(relu(1 - head(r)).mean() + relu(1 + head(f)).mean()
                       for head, r, f in zip(self.heads, real_features, fake_features, strict=True))
            self.head_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.heads.parameters(), 1.0)
            self.head_optimizer.step()
        self.heads.requires_grad_(False)  # the student's loss: through the frozen teacher, heads held fixed
        try:
            logits = self.logits(alpha * x_g + sigma * eps_fake, t, **cond)
        finally:
            self.heads.requires_grad_(True)
        return -sum(logit.float().mean() for logit in logits)

