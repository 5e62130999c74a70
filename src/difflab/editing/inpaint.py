"""Training-free inpainting for every sampler: the denoiser that knows the kept region.

The kept region's x0 is known, so :class:`Inpainting` returns it there instead of the network's
estimate (the replacement method of Song et al. 2021, "Score-Based Generative Modeling through
SDEs", and of RePaint). Every sampler is a linear combination of its state and of x0 estimates
that reproduces the forward process when the estimate is exact, so the kept region follows
``alpha(t) x0 + sigma(t) eps`` along the whole run, the network always sees it correctly noised,
and the final image equals the input there bit for bit. RePaint's resampling (Lugmayr et al.
2022) re-noises each stretch of ``jump`` steps and walks it again ``resample`` times, to harmonise
the repainted region with its surroundings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from difflab.batch import tiled
from difflab.editing.img2img import noised, start_grid
from difflab.editing.inputs import check_image, check_mask
from difflab.samplers import Generator, PartialGrid, noise_like, run

Tensor = torch.Tensor


class Inpainting(nn.Module):
    """A denoiser whose estimate is ``known`` where ``mask`` is 0 (kept), the wrapped denoiser's
    where it is 1 (repainted) and their blend in between (a feathered edge)."""

    def __init__(self, denoiser: Any, known: Tensor, mask: Tensor):
        super().__init__()
        self.denoiser, self.process = denoiser, denoiser.process
        self.known, self.mask = known, mask

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        d = self.denoiser(x, t, **cond)
        known, mask = self.known.to(d.dtype), self.mask.to(d.dtype)
        blend = torch.where(mask >= 1, d, known + mask * (d - known))
        return torch.where(mask <= 0, known, blend)


def inpainting_inputs(image: Tensor, mask: Tensor) -> Tensor:
    """What a trained inpainting model takes beside its noisy input (``concat``): the mask and the
    image with the masked region zeroed, mask first (Stable Diffusion's inpainting models' layout)."""
    mask = mask.to(image.dtype)
    return torch.cat([mask, image * (1 - mask)], 1)


class WithInputs(nn.Module):
    """A denoiser whose network also takes ``concat`` inputs (a trained inpainting model's mask and
    masked image), tiled to every batch it is called with (guidance calls it on [cond, uncond])."""

    def __init__(self, denoiser: Any, concat: Tensor):
        super().__init__()
        self.denoiser, self.process, self.concat = denoiser, denoiser.process, concat

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        return self.denoiser(x, t, concat=tiled(self.concat, x.shape[0], "inpainting inputs"), **cond)


def renoise(process: Any, x: Tensor, t_from: float, t_to: float, generator: Generator) -> Tensor:
    """A draw of q(x_{t_to} | x_{t_from}) for t_to > t_from: the forward process's transition."""
    t = torch.tensor([t_from, t_to], dtype=torch.float64)
    (a_i, a_j), (s_i, s_j) = process.alpha(t).tolist(), process.sigma(t).tolist()
    ratio = a_j / a_i
    std = math.sqrt(max(0.0, s_j * s_j - (ratio * s_i) ** 2))
    return ratio * x + std * noise_like(x, generator)


def inpaint(denoiser: Any, image: Tensor, mask: Tensor, *, sampler: str = "dpmpp_2m", steps: int = 20,
            schedule: str | Tensor | Sequence[float] = "karras", strength: float = 1.0, resample: int = 1,
            jump: int = 1, noise: Tensor | None = None, generator: Generator = None,
            cond: dict[str, Any] | None = None, schedule_options: dict[str, Any] | None = None,
            callback: Any = None, return_nfe: bool = False, **options: Any) -> Tensor | tuple[Tensor, int]:
    """Repaint ``image`` where ``mask`` is 1 (pixels or latents; soft values blend) and keep it
    exactly where the mask is 0. ``strength`` < 1 starts the repainted region from the noised
    image (SDEdit inside the mask). ``resample`` > 1 is RePaint: every ``jump`` steps the state is
    re-noised back over them and they are walked again, ``resample`` walks in all (a multistep
    sampler restarts its history on each walk); this costs ``resample`` times the evaluations."""
    image = check_image(image)
    mask = check_mask(mask, image)
    for name, value in (("resample", resample), ("jump", jump)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    process = denoiser.process
    ts = start_grid(process, schedule, steps, strength, schedule_options)
    noise = noise_like(image, generator) if noise is None else noise
    start = noised(process, image, float(ts[0]), noise)
    if strength == 1.0:  # the repainted region starts from noise alone, as plain sampling does
        start = torch.where(mask > 0, noised(process, torch.zeros_like(image), float(ts[0]), noise), start)
    model = Inpainting(denoiser, image, mask)
    if resample == 1:
        return run(model, start, ts, sampler, generator=generator, callback=callback, cond=cond,
                   return_nfe=return_nfe, **options)
    x, evals, points = start, 0, ts.tolist()
    for lo in range(0, len(points) - 1, jump):
        hi = min(lo + jump, len(points) - 1)
        piece = points[lo: hi + 1]
        final = piece[-1] == 0.0
        walks = 1 if final else resample  # the piece that ends at 0 is walked once
        grid = torch.tensor(piece, dtype=torch.float64) if final else PartialGrid.of(piece)
        for walk in range(walks):
            y, nfe = run(model, x, grid, sampler, generator=generator, callback=callback, cond=cond,
                         return_nfe=True, **options)
            evals += nfe
            x = renoise(process, y, piece[-1], piece[0], generator) if walk < walks - 1 else y
    return (x, evals) if return_nfe else x
