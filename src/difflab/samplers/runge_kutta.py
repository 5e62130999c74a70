"""Runge-Kutta samplers in an ODE form ``dy/dk = (y - D) / k``: Heun (EDM) and DPM-2."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from difflab.samplers.base import (
    Callback,
    DenoiseFn,
    Generator,
    Grid,
    churn_points,
    churned_denoise,
    coords,
    level_point,
    register,
    resolve_variable,
)

Tensor = torch.Tensor


def _churned_two_stage(denoiser: DenoiseFn, x: Tensor, grid: Grid, variable: str, hats: list, s_noise: float,
                       generator: Generator, callback: Callback, second: Callable[..., Tensor]) -> Tensor:
    """The loop of the churned two-evaluation methods (EDM's Algorithm 2 and its relatives): churn,
    denoise at the raised level, then ``second(i, y, d, ki, cj, kj)`` takes ``y = c x`` to the next
    level with one more evaluation; the step onto sigma = 0 is the denoised value itself."""
    t_hat = grid.times([h[0] for h in hats])
    for i in range(grid.steps):
        _, a_hat, s_hat, _ = hats[i]
        x, d = churned_denoise(denoiser, x, i, grid, hats, t_hat, s_noise, generator, callback)
        if grid.is_final(i):
            x = d
            continue
        ci, ki = coords(variable, a_hat, s_hat)
        cj, kj = coords(variable, grid.alpha[i + 1], grid.sigma[i + 1])
        x = second(i, ci * x, d, ki, cj, kj) / cj
    return x


@register("heun", "Karras et al. 2022, Elucidating the Design Space (Algorithm 2)", stochastic=True)
def sample_heun(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                callback: Callback = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0, variable: str = "auto") -> Tensor:
    """Heun's second-order method (two evaluations per step; the step onto 0 is one denoise).

    ``variable`` picks the ODE form (see :func:`~difflab.samplers.base.resolve_variable`): the
    paper's noise level, or the flow form that stays finite where alpha = 0.
    """
    grid = Grid.build(denoiser.process, ts, x)
    variable = resolve_variable(grid, variable)
    times = grid.times()

    def trapezoid(i: int, y: Tensor, d: Tensor, ki: float, cj: float, kj: float) -> Tensor:
        slope = (y - d) / ki
        y_euler = y + (kj - ki) * slope
        slope2 = (y_euler - denoiser(y_euler / cj, times[i + 1])) / kj
        return y + (kj - ki) * 0.5 * (slope + slope2)

    return _churned_two_stage(denoiser, x, grid, variable, churn_points(grid, s_churn, s_tmin, s_tmax), s_noise,
                              generator, callback, trapezoid)


@register("dpm_2", "Crowson 2022, k-diffusion (DPM-2, after Lu et al. 2022, DPM-Solver-2)", stochastic=True)
def sample_dpm_2(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                 callback: Callback = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0, variable: str = "auto") -> Tensor:
    """Midpoint method with the midpoint at the geometric mean of the two ODE levels."""
    grid = Grid.build(denoiser.process, ts, x)
    variable = resolve_variable(grid, variable)
    hats = churn_points(grid, s_churn, s_tmin, s_tmax)
    mids = []
    for i in range(grid.steps):
        _, a_hat, s_hat, _ = hats[i]
        if grid.is_final(i):
            mids.append((grid.t[i], 0.0, 1.0))
            continue
        ki = coords(variable, a_hat, s_hat)[1]
        kj = coords(variable, grid.alpha[i + 1], grid.sigma[i + 1])[1]
        k_mid = math.sqrt(ki * kj)
        t_m, a_m, s_m = level_point(grid, variable, k_mid)
        mids.append((t_m, k_mid, coords(variable, a_m, s_m)[0]))
    t_mid = grid.times([m[0] for m in mids])

    def midpoint(i: int, y: Tensor, d: Tensor, ki: float, cj: float, kj: float) -> Tensor:
        _, k_mid, c_mid = mids[i]
        y_mid = y + (k_mid - ki) * (y - d) / ki
        return y + (kj - ki) * (y_mid - denoiser(y_mid / c_mid, t_mid[i])) / k_mid

    return _churned_two_stage(denoiser, x, grid, variable, hats, s_noise, generator, callback, midpoint)
