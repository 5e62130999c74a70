"""Calibration that runs samplers: a grid of t tuned for one model, sampler and step count.

It lives on the samplers' floor because it calls them; ``schedules`` only describes grids.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    cond: dict[str, Tensor] | None = None,
) -> Tensor:
    """A grid of t that minimises ``sampler``'s error at ``steps`` on a calibration batch.

    In the spirit of Align Your Steps (Sabour et al. 2024): instead of their KL bound, the mean
    squared error to a reference endpoint from the same noise is minimised directly. The interior
    points are parametrised as softmax increments of the log noise level, so the grid stays
    ordered; Nelder-Mead starts from the best of the ``init`` schedules and restarts around its
    optimum. The calibration batch is split in two: a grid is accepted only if it also beats the
    starting schedule on the half it was not tuned on, so the result never overfits into a worse
    grid. ``cond`` (one row per sample) goes to the denoiser with its samples. ``reference``
    defaults to ``reference_sampler`` at ``reference_steps``; pass exact
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
        reference = samplers.sample(denoiser, noise, reference_sampler, steps=reference_steps, schedule="karras",
                                    cond=cond)
    half = noise.shape[0] // 2
    fit, check = (slice(0, half), reference[:half]), (slice(half, None), reference[half:])
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
        part = batch[0]
        out = samplers.sample(denoiser, noise[part], sampler, steps=steps, schedule=grid,
                              cond={k: v[part] for k, v in (cond or {}).items()}, **options)
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


#: the named schedules a calibration starts from (the best of them is what it must beat)
NAMED_STARTS = ("karras", "logsnr", "polynomial", "trailing", "uniform")

#: samplers whose per-step coefficients ``tune`` calibrates besides the grid, and the option it sets
TUNABLE = {"unipc": "dc_ratios"}


@dataclass(frozen=True)
class Tuned:
    """A calibrated way to sample (:class:`~difflab.samplers.SamplerSpec` with an explicit grid and
    calibrated options) and what it bought: the mean squared error to the reference on the
    calibration batch before (``start``: the sampler on its best named schedule) and after."""

    spec: Any
    start_mse: float
    tuned_mse: float
    seconds: float

    def to_config(self) -> dict[str, Any]:
        return {"spec": self.spec.to_config(), "start_mse": self.start_mse, "tuned_mse": self.tuned_mse,
                "seconds": self.seconds}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Tuned:
        from difflab.samplers import SamplerSpec

        return cls(SamplerSpec.from_config(config["spec"]), float(config["start_mse"]), float(config["tuned_mse"]),
                   float(config["seconds"]))


def tune(
    denoiser: Any,
    steps: int,
    noise: Tensor,
    *,
    sampler: str = "unipc",
    sampler_options: dict[str, Any] | None = None,
    reference: Tensor | None = None,
    reference_sampler: str = "dpmpp_3m",
    reference_steps: int = 200,
    max_evals: int = 800,
    coefficient_evals: int = 400,
    cond: dict[str, Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Tuned:
    """Calibrate ``sampler`` at ``steps`` evaluations for one model: the grid of t
    (:func:`optimize_schedule`, Align-Your-Steps-like), then, for samplers in :data:`TUNABLE`, the
    per-step coefficients on that grid — for UniPC the dynamic-compensation ratios of DC-Solver
    (Zhao et al. 2024), here fitted jointly to the endpoint error by Nelder-Mead instead of step by
    step to a reference trajectory. Both stages accept a result only if it also lowers the error
    on the half of the calibration batch it was not fitted on. Deterministic for a given batch.
    ``cond`` (one row per sample) goes to the denoiser with its samples."""
    from scipy.optimize import minimize

    from difflab import samplers

    started = time.perf_counter()
    options = dict(sampler_options or {})
    samplers.check_options(sampler, options)
    say = progress or (lambda message: None)
    if reference is None:
        say(f"reference: {reference_sampler} at {reference_steps} steps")
        reference = samplers.sample(denoiser, noise, reference_sampler, steps=reference_steps, schedule="karras",
                                    cond=cond)
    half = noise.shape[0] // 2

    def mse(grid: Tensor, opts: dict[str, Any], part: slice) -> float:
        out = samplers.sample(denoiser, noise[part], sampler, schedule=grid,
                              cond={k: v[part] for k, v in (cond or {}).items()}, **opts)
        value = float(((out - reference[part]) ** 2).mean())
        return value if math.isfinite(value) else 1e9

    whole = slice(None)
    start = min((schedules.get(name, denoiser.process, steps) for name in NAMED_STARTS),
                key=lambda g: mse(g, options, whole))
    start_mse = mse(start, options, whole)
    say(f"schedule at {steps} steps")
    grid = optimize_schedule(denoiser, sampler, steps, noise, reference=reference, sampler_options=options,
                             max_evals=max_evals, cond=cond, init=NAMED_STARTS) if steps >= 2 else start
    key = TUNABLE.get(sampler)
    if key is not None and key not in options and steps >= 2:
        say(f"{key} at {steps} steps")
        fit, check = slice(0, half), slice(half, None)

        def with_ratios(r) -> dict[str, Any]:
            return {**options, key: [float(v) for v in r]}

        result = minimize(lambda r: mse(grid, with_ratios(r), fit), [1.0] * steps, method="Nelder-Mead",
                          options={"maxfev": coefficient_evals, "xatol": 1e-4, "fatol": 1e-14, "adaptive": True})
        if mse(grid, with_ratios(result.x), check) < mse(grid, options, check):
            options = with_ratios(result.x)
    tuned_mse = mse(grid, options, whole)
    spec = samplers.SamplerSpec(sampler, steps, tuple(grid.tolist()), options)
    return Tuned(spec, start_mse, tuned_mse, time.perf_counter() - started)
