"""Bespoke non-stationary solvers: a linear multistep method whose every coefficient is fitted to one
model and step count (Shaul et al. 2024, "Bespoke Non-Stationary Solvers for Fast Sampling of
Diffusion and Flow Models")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from difflab.samplers.base import Callback, DenoiseFn, Generator, Grid, evaluate, register

Tensor = torch.Tensor


def ddim_rows(grid: Grid) -> list[list[float]]:
    """DDIM written as a bespoke solver: ``x_{i+1} / sigma_{i+1} = x_T / sigma_0 + sum_j (snr_{j+1} -
    snr_j) D_j`` with snr = alpha / sigma, so the rows are ``[1, (snr_{j+1} - snr_j) / snr_{i+1} ...]``;
    the final row (sigma = 0) is the last output alone."""
    snr = [a / s if s > 0 else math.inf for a, s in zip(grid.alpha, grid.sigma, strict=True)]
    rows = []
    for i in range(grid.steps):
        if grid.is_final(i):
            rows.append([0.0] * (i + 1) + [1.0])
        else:
            rows.append([1.0] + [(snr[j + 1] - snr[j]) / snr[i + 1] for j in range(i + 1)])
    return rows


def check_rows(rows: Sequence[Sequence[float]], steps: int) -> list[list[float]]:
    """Rows as floats, checked: row i has i + 2 finite entries (on x_T, then on D_0 .. D_i)."""
    out = [[float(v) for v in row] for row in rows]
    bad = len(out) != steps or any(len(row) != i + 2 for i, row in enumerate(out))
    if bad or not all(math.isfinite(v) for row in out for v in row):
        raise ValueError(f"bespoke coefficients need {steps} rows of 2, 3, ..., {steps + 1} finite numbers (one row "
                         f"per step), got rows of lengths {[len(r) for r in out][:8]}; fit them with "
                         "difflab.samplers.calibration.tune(..., bespoke=True) for this grid")
    return out


def rollout(denoiser: DenoiseFn, x: Tensor, times: Tensor, alpha: Sequence[float | Tensor],
            sigma: Sequence[float | Tensor], rows: Sequence[Sequence[float | Tensor]],
            callback: Callback = None) -> Tensor:
    """Walk the grid ``times`` (with its ``alpha`` and ``sigma``): evaluate ``D_i`` at ``x_i``, then
    ``x_{i+1} = (sigma_{i+1} / sigma_0) r_i0 x_T + alpha_{i+1} sum_j r_i(j+1) D_j``. Every number may
    be a tensor that requires grad (fitting the coefficients, and the times with them)."""
    x_start, outputs = x, []
    for i, row in enumerate(rows):
        outputs.append(evaluate(denoiser, x, times[i], i, callback))
        x = (sigma[i + 1] / sigma[0] * row[0]) * x_start
        for w, d in zip(row[1:], outputs, strict=True):
            x = x + (alpha[i + 1] * w) * d
    return x


@register("bns", "Shaul et al. 2024, Bespoke Non-Stationary Solvers for Fast Sampling of Diffusion and Flow Models")
def sample_bns(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
               coefficients: Sequence[Sequence[float]] | None = None) -> Tensor:
    """A non-stationary linear multistep solver: each step's state is its own linear combination of
    the start ``x_T`` and every denoised output so far (:func:`rollout`), one evaluation per step.
    Every difflab multistep sampler is one such method on its grid (DDIM, DPM-Solver++(2M), UniPC
    with or without DC-Solver's compensation), so fitting starts from the best of them; without
    ``coefficients`` it is DDIM. Coefficients belong to the grid they were fitted on."""
    grid = Grid.build(denoiser.process, ts, x)
    if grid.steps and grid.t[1] > grid.t[0]:
        raise ValueError("bns integrates down only: its coefficients belong to the descending grid they were "
                         "fitted on; invert with ddim, dpmpp_2m or unipc")
    rows = ddim_rows(grid) if coefficients is None else check_rows(coefficients, grid.steps)
    return rollout(denoiser, x, grid.times(), grid.alpha, grid.sigma, rows, callback)
