"""Calibration that runs samplers: a grid of t tuned for one model, sampler and step count.

It lives on the samplers' floor because it calls them; ``schedules`` only describes grids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from difflab import schedules
from difflab.schedules import LevelSpace, check_steps, finish_grid

Tensor = torch.Tensor


def optimize_schedule(
    denoiser: Any,
    sampler: str,
    steps: int,
    noise: Tensor,
    *,
    reference: Tensor | None = None,
    init: str | Sequence[str] = ("karras", "logsnr", "polynomial", "trailing"),
    sampler_options: dict[str, Any] | None = None,
    reference_sampler: str = "dpmpp_3m",
    reference_steps: int = 200,
    max_evals: int = 1500,
    restarts: int = 2,
) -> Tensor:
    """A grid of t that minimises ``sampler``'s error at ``steps`` on a calibration batch.

    In the spirit of Align Your Steps (Sabour et al. 2024): instead of their KL bound, the mean
    squared error to a reference endpoint from the same noise is minimised directly. The interior
    points are parametrised as softmax increments of the log noise level, so the grid stays
    ordered; Nelder-Mead starts from the best of the ``init`` schedules and restarts around its
    optimum. The calibration batch is split in two: a grid is accepted only if it also beats the
    starting schedule on the half it was not tuned on, so the result never overfits into a worse
    grid. ``reference`` defaults to ``reference_sampler`` at ``reference_steps``; pass exact
    endpoints when they are known (``GaussianMixture.ode_solve``). Save the result with
    :func:`difflab.schedules.save` and use it as ``schedule="optimized"`` with ``path=`` or as an explicit grid.
    """
    from scipy.optimize import minimize

    from difflab import samplers

    check_steps(steps)
    if steps < 2:
        raise ValueError("a one-step grid has no interior point to optimise")
    if noise.shape[0] < 4:
        raise ValueError(f"the calibration batch needs at least 4 samples, got {noise.shape[0]}")
    process = denoiser.process
    options = sampler_options or {}
    samplers.check_options(sampler, options)
    if reference is None:
        reference = samplers.sample(denoiser, noise, reference_sampler, steps=reference_steps, schedule="karras")
    half = noise.shape[0] // 2
    fit, check = (noise[:half], reference[:half]), (noise[half:], reference[half:])
    space = LevelSpace(process)
    w_hi, w_floor = math.log(space.hi), math.log(space.lo) - math.log(10.0)

    def params_of(grid: Tensor):
        levels = process.noise_level(grid[1:-1])
        if space.bounded:
            levels = levels / (1 + levels)
        w = torch.cat([torch.tensor([w_hi], dtype=torch.float64), levels.log(), torch.tensor([w_floor])])
        return (-(w[1:] - w[:-1]) / (w_hi - w_floor)).clamp_min(1e-6).log().numpy()

    def grid_of(z) -> Tensor:
        inc = torch.softmax(torch.as_tensor(z, dtype=torch.float64), 0)
        w = w_hi - torch.cumsum(inc, 0)[:-1] * (w_hi - w_floor)
        t_inner = space.to_t(w.exp())
        return finish_grid(process, torch.cat([t_inner.new_zeros(1), t_inner]))

    def error(grid: Tensor, batch: tuple[Tensor, Tensor]) -> float:
        if not bool((grid[1:] < grid[:-1]).all()):
            return 1e9
        out = samplers.sample(denoiser, batch[0], sampler, steps=steps, schedule=grid, **options)
        value = float(((out - batch[1]) ** 2).mean())
        return value if math.isfinite(value) else 1e9

    names = [init] if isinstance(init, str) else list(init)
    start = min((schedules.get(name, process, steps) for name in names), key=lambda g: error(g, fit))
    best_z, best_fit = params_of(start), error(start, fit)
    for _ in range(max(1, restarts)):
        result = minimize(lambda z: error(grid_of(z), fit), best_z, method="Nelder-Mead",
                          options={"maxfev": max_evals // max(1, restarts), "xatol": 1e-4, "fatol": 1e-14,
                                   "adaptive": True})
        if result.fun < best_fit:
            best_z, best_fit = result.x, result.fun
    tuned = grid_of(best_z)
    return tuned if error(tuned, check) < error(start, check) else start
