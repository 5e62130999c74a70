"""Restart sampling: an ODE sampler interleaved with forward noise jumps (Xu et al. 2023)."""

from __future__ import annotations

import math

import torch

from difflab.samplers.base import (
    Callback,
    DenoiseFn,
    Generator,
    Grid,
    PartialGrid,
    deterministic,
    get,
    noise_like,
    register,
)

Tensor = torch.Tensor


def _offset(callback: Callback, start: int) -> Callback:
    if callback is None:
        return None
    return lambda i, t, x, d: callback(start + i, t, x, d)


@register("restart", "Xu et al. 2023, Restart Sampling for Improving Generative Processes", stochastic=True)
def sample_restart(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                   callback: Callback = None, solver: str = "heun", restart_min: float = 0.06,
                   restart_max: float = 0.30, restarts: int = 1, restart_steps: int = 3) -> Tensor:
    """Walk the grid with the deterministic ``solver`` down to the grid point whose noise level
    sigma/alpha is closest to ``restart_min``; then ``restarts`` times jump forward to the level
    ``restart_max`` with the process's exact transition kernel (fresh noise) and solve back down in
    ``restart_steps`` log-uniform steps; then finish the grid. The forward noise contracts the
    accumulated error of the ODE while the ODE steps add little of their own (the paper's Restart
    algorithm, for any process: the jump is ``x_M = (alpha_M / alpha_m) x_m + sqrt(sigma_M^2 -
    (alpha_M sigma_m / alpha_m)^2) eps``). Costs ``restarts * restart_steps`` solver steps extra.
    A grid with no interior point below ``restart_max`` is walked without restarts."""
    info = get(solver)
    if not deterministic(solver):
        raise ValueError(f"restart needs a deterministic ODE solver, not {solver!r}; try 'heun' or 'dpmpp_2m'")
    if not 0 < restart_min < restart_max:
        raise ValueError(f"need 0 < restart_min < restart_max, got {restart_min} and {restart_max}")
    if restarts < 0 or restart_steps < 1:
        raise ValueError(f"restarts must be >= 0 and restart_steps >= 1, got {restarts} and {restart_steps}")
    grid = Grid.build(denoiser.process, ts, x)
    levels = [s / a if a > 0 else math.inf for a, s in zip(grid.alpha, grid.sigma, strict=True)]
    interior = range(1, grid.steps)  # points with 0 < sigma and a step before them
    below = [i for i in interior if levels[i] < restart_max]
    t_hi, a_hi, s_hi = grid.point_at_level(restart_max)
    if restarts == 0 or not below or t_hi > grid.process.t_max:
        return info.fn(denoiser, x, ts, callback=callback)  # no grid point in reach of the restart interval
    m = min(below, key=lambda i: abs(math.log(levels[i] / restart_min)))
    a_m, s_m = grid.alpha[m], grid.sigma[m]
    jump_scale = a_hi / a_m
    jump_std = math.sqrt(max(0.0, s_hi**2 - (jump_scale * s_m) ** 2))
    inner = [grid.point(lam)[0] for lam in torch.linspace(-math.log(restart_max), grid.lam[m],
                                                           restart_steps + 1, dtype=torch.float64).tolist()]
    inner[0], inner[-1] = t_hi, grid.t[m]
    done = 0
    x = info.fn(denoiser, x, PartialGrid.of(grid.t[: m + 1]), callback=_offset(callback, done))
    done += m
    for _ in range(restarts):
        x = jump_scale * x + jump_std * noise_like(x, generator)
        x = info.fn(denoiser, x, PartialGrid.of(inner), callback=_offset(callback, done))
        done += restart_steps
    return info.fn(denoiser, x, torch.tensor(grid.t[m:], dtype=torch.float64),
                   callback=_offset(callback, done))
