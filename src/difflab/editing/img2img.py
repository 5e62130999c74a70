"""img2img / SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations"): noise the image to the strength's t, then sample from there."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from difflab import schedules
from difflab.editing.inputs import check_image, check_strength
from difflab.samplers import Generator, grid_of, noise_like, run

Tensor = torch.Tensor


def start_grid(process: Any, schedule: str | Tensor | Sequence[float], steps: int, strength: float,
               schedule_options: dict[str, Any] | None = None) -> Tensor:
    """The grid a run at ``strength`` walks: the full grid of ``steps`` started at
    ``t = strength * t_start`` (:func:`difflab.schedules.truncate`), so about ``strength * steps``
    steps with the schedule's own spacing (the count diffusers and A1111 take)."""
    full = grid_of(process, schedule, steps, schedule_options)
    return schedules.truncate(full, check_strength(strength) * float(full[0]))


def noised(process: Any, image: Tensor, t: float, noise: Tensor) -> Tensor:
    """The forward process at ``t``: ``alpha(t) image + sigma(t) noise``."""
    t64 = torch.tensor(t, dtype=torch.float64)
    return float(process.alpha(t64)) * image + float(process.sigma(t64)) * noise


def img2img(denoiser: Any, image: Tensor, strength: float, *, sampler: str = "dpmpp_2m", steps: int = 20,
            schedule: str | Tensor | Sequence[float] = "karras", noise: Tensor | None = None,
            generator: Generator = None, cond: dict[str, Any] | None = None,
            schedule_options: dict[str, Any] | None = None, callback: Any = None, return_nfe: bool = False,
            **options: Any) -> Tensor | tuple[Tensor, int]:
    """Sample from ``image`` (the sampler's state space: pixels or latents) pushed back to the
    strength's t with fresh ``noise`` (drawn from ``generator`` when not given). Strength 1 starts
    from the most noise the process has (for a VP process the image still shows through alpha(1));
    any sampler, schedule and guided denoiser works."""
    image = check_image(image)
    ts = start_grid(denoiser.process, schedule, steps, strength, schedule_options)
    noise = noise_like(image, generator) if noise is None else noise
    if noise.shape != image.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, the image {tuple(image.shape)}")
    x = noised(denoiser.process, image, float(ts[0]), noise)
    return run(denoiser, x, ts, sampler, generator=generator, callback=callback, cond=cond, return_nfe=return_nfe,
               **options)
