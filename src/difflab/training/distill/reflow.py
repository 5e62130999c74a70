"""Reflow (Liu et al. 2023, Flow Straight and Fast: 2-rectified flow) and its one-step distillation
(InstaFlow, Liu et al. 2024): pair noise with the teacher's sample from it, then learn the straight
line between them, or the jump itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from difflab import predictions, samplers
from difflab.processes import Process
from difflab.training.distill.teacher import Teacher
from difflab.training.losses import diffusion_loss

Tensor = torch.Tensor


@torch.no_grad()
def teacher_pairs(teacher: Teacher, shape: tuple[int, ...], n: int, conditions: Callable[[Tensor], dict[str, Any]],
                  *, sampler: str = "heun", steps: int = 20, schedule: str = "karras", seed: int = 0,
                  batch_size: int = 256, device: torch.device | str = "cpu",
                  progress: bool = True) -> dict[str, Tensor]:
    """``n`` (noise, teacher sample) pairs: noise from ``seed`` (batch-invariant: sample i from its
    own generator), each row's condition from ``conditions(rows)``, the teacher's deterministic ODE
    sampler (refused if it draws noise: the pair would not be a coupling of the ODE)."""
    if not samplers.deterministic(sampler):
        raise ValueError(f"reflow pairs need a deterministic sampler; {sampler!r} draws noise")
    noise, samples = [], []
    bar = tqdm(range(0, n, batch_size), desc="teacher pairs", disable=not progress, dynamic_ncols=True)
    for start in bar:
        rows = torch.arange(start, min(n, start + batch_size))
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(r)))
                         for r in rows]).to(device)
        x = samplers.sample(teacher, z, sampler, steps, schedule, cond=conditions(rows))
        noise.append(z.cpu())
        samples.append(x.cpu())
    return {"noise": torch.cat(noise), "x0": torch.cat(samples)}


@dataclass(frozen=True)
class PairedObjective:
    """The diffusion loss on the teacher's coupling: x0 is the pair's sample and the noise is its
    own noise (``noise[batch["index"]]``), so on the flow process x_t runs along the straight line
    between them (reflow). ``one_step``: t = t_max only, i.e. the jump noise -> sample (InstaFlow)."""

    process: Process
    prediction: predictions.Prediction
    noise: Tensor
    one_step: bool = False
    weighting: str = "none"

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Tensor], **cond: Any) -> Tensor:
        x0 = batch["x0"]
        noise = self.noise[batch["index"].cpu()].to(x0.device, x0.dtype)
        t = torch.full_like(batch["t"], self.process.t_max) if self.one_step else batch["t"]
        return diffusion_loss(net, x0, self.process, self.prediction, t=t, noise=noise, weighting=self.weighting,
                              **cond).mean()
