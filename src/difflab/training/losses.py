"""The diffusion training loss ``w(t) * ||prediction - target||^2`` for every prediction type.

A weighting is defined once, in x0 space: ``w_x0(t) * ||x0_hat - x0||^2``. For a prediction whose
error relates to the x0 error by ``||out - target|| = c(t) ||x0_hat - x0||`` (c^2 = SNR for eps,
SNR + 1 for VP v, 1 for x0, 1 / c_out^2 for EDM), the weight applied to the prediction's MSE is
``w_x0 / c^2``. So a weighting means the same thing whatever the network predicts, and
``weighting="none"`` is each prediction's own plain MSE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from difflab import predictions
from difflab.batch import per_sample
from difflab.editing.inpaint import inpainting_inputs
from difflab.processes import Process

Tensor = torch.Tensor
WEIGHTINGS = ("none", "min_snr", "edm")


def loss_weight(weighting: str, prediction: predictions.Prediction, alpha: Tensor, sigma: Tensor, *,
                gamma: float = 5.0, sigma_data: float = 0.5) -> Tensor:
    """Weight on the prediction's squared error.

    ``none``: 1. ``min_snr``: x0 weight min(SNR, gamma) (Hang et al. 2023, Min-SNR-gamma).
    ``edm``: x0 weight (s^2 + sigma_data^2) / (s sigma_data)^2 with s = sigma / alpha
    (Karras et al. 2022, lambda(sigma)).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if weighting == "none":
        return torch.ones_like(alpha)
    snr = (alpha / sigma) ** 2
    if weighting == "min_snr":
        w_x0 = snr.clamp(max=gamma)
    else:
        level2 = (sigma / alpha) ** 2
        w_x0 = (level2 + sigma_data**2) / (level2 * sigma_data**2)
    return w_x0 / prediction.x0_error_scale(alpha, sigma)


def diffusion_loss(
    net: Callable[..., Tensor],
    x0: Tensor,
    process: Process,
    prediction: str | predictions.Prediction,
    *,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    weighting: str = "none",
    t_distribution: str | None = None,
    generator: torch.Generator | None = None,
    gamma: float = 5.0,
    **cond: Any,
) -> Tensor:
    """Per-sample loss ``w(t) * mean((net(c_in x_t, model_time) - target)^2)``.

    t is drawn from the process's training distribution unless given; ``cond`` goes to the net.
    """
    pred = predictions.get(prediction)
    b = x0.shape[0]
    if t is None:
        t = process.sample_t(b, distribution=t_distribution, generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match data shape {tuple(x0.shape)}")
    alpha = per_sample(process.alpha(t).to(x0.dtype), x0)
    sigma = per_sample(process.sigma(t).to(x0.dtype), x0)
    x_t = alpha * x0 + sigma * noise
    out = net(pred.input_scale(alpha, sigma) * x_t, process.model_time(t), **cond)
    target = pred.target(x0, noise, alpha, sigma)
    diff = out - target
    if diff.dtype in (torch.float16, torch.bfloat16):  # reduce in float32 under mixed precision
        diff = diff.float()
    mse = diff.pow(2).flatten(1).mean(1)
    sigma_data = getattr(pred, "sigma_data", 0.5)
    w = loss_weight(weighting, pred, alpha, sigma, gamma=gamma, sigma_data=sigma_data).flatten(1)[:, 0]
    return w.to(mse.dtype) * mse


def drop_condition(labels: Tensor, probability: float, generator: torch.Generator | None = None,
                   null: int = -1) -> Tensor:
    """Replace each label by the null class with ``probability`` (classifier-free guidance training,
    Ho & Salimans 2022)."""
    if probability <= 0:
        return labels
    drop = torch.rand(labels.shape[0], generator=generator, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null), labels)


def immiscible_noise(x0: Tensor, noise: Tensor) -> Tensor:
    """Re-pair the batch's noise with its images to minimise the total distance (Li et al. 2024,
    Immiscible Diffusion), by linear assignment (scipy). Returns a permutation of ``noise``."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.flatten(1).float(), noise.flatten(1).float()).cpu().numpy()
    _, cols = linear_sum_assignment(cost)
    return noise[torch.as_tensor(cols, device=noise.device)]


@dataclass(frozen=True)
class DiffusionObjective:
    """The loss a trainer minimises: ``objective(net, batch, **cond)`` with ``batch`` holding ``x0``,
    ``noise`` and ``t`` (a :class:`~difflab.training.batches.BatchPlan` draw) -> the mean
    :func:`diffusion_loss`. Other recipes (distillation, adapters) pass their own callable of the same
    form to the trainer."""

    process: Process
    prediction: predictions.Prediction
    weighting: str = "none"
    gamma: float = 5.0

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Tensor], **cond: Any) -> Tensor:
        return diffusion_loss(net, batch["x0"], self.process, self.prediction, t=batch["t"], noise=batch["noise"],
                              weighting=self.weighting, gamma=self.gamma, **cond).mean()


def inpainting_masks(seeds: Tensor, shape: tuple[int, int], full_rate: float) -> Tensor:
    """One mask (1 = repaint) per seed: a random rectangle covering 10-100 % of each side, or, with
    probability ``full_rate``, everything (so the model also generates from nothing). (N, 1, H, W)."""
    h, w = shape
    masks = torch.zeros(len(seeds), 1, h, w)
    for i, seed in enumerate(seeds.tolist()):
        g = torch.Generator().manual_seed(int(seed))
        if float(torch.rand((), generator=g)) < full_rate:
            masks[i] = 1
            continue
        mh = int(torch.randint(max(1, h // 10), h + 1, (), generator=g))
        mw = int(torch.randint(max(1, w // 10), w + 1, (), generator=g))
        top = int(torch.randint(0, h - mh + 1, (), generator=g))
        left = int(torch.randint(0, w - mw + 1, (), generator=g))
        masks[i, :, top: top + mh, left: left + mw] = 1
    return masks


@dataclass(frozen=True)
class InpaintingObjective:
    """The diffusion loss of an inpainting model (Rombach et al. 2022, the way Stable Diffusion's
    inpainting models were made): each sample gets a seeded random mask (:func:`inpainting_masks`)
    and the network sees the mask and the masked image through ``concat``."""

    process: Process
    prediction: predictions.Prediction
    weighting: str = "none"
    gamma: float = 5.0
    full_rate: float = 0.25

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Tensor], **cond: Any) -> Tensor:
        x0 = batch["x0"]
        mask = inpainting_masks(batch["seeds"], tuple(x0.shape[-2:]), self.full_rate).to(x0.device)
        return diffusion_loss(net, x0, self.process, self.prediction, t=batch["t"], noise=batch["noise"],
                              weighting=self.weighting, gamma=self.gamma, concat=inpainting_inputs(x0, mask),
                              **cond).mean()
