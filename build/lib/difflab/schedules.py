"""Grids of t that samplers walk, from ``t_max`` down to ``t = 0`` (clean data).

Every schedule returns ``steps + 1`` descending points in float64: the first is the process's
``t_max``, the last is exactly 0. The step onto 0 is the final denoise ``x0 = D(x, t_last)``, so a
first-order sampler spends exactly ``steps`` network evaluations. Most schedules place their
points between ``t_max`` and ``t_min`` (the smallest trained noise level) and then step to 0, as
diffusers' "linspace" spacing and k-diffusion do; ``trailing`` ends its even spacing at 0 itself.

Noise-level schedules (``karras``, ``logsnr``, ``polynomial``) are defined on the VE noise level
``s = sigma / alpha``. Where that is infinite at ``t_max`` (rectified flow, zero terminal SNR) they
are defined on ``k = sigma / (alpha + sigma) = s / (1 + s)`` instead, which is 1 there and ~ s at
low noise (for rectified flow k = t, as ComfyUI does): the first step then shrinks with the step
count as every other step does.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from difflab.processes import Process

Tensor = torch.Tensor
ScheduleFn = Callable[..., Tensor]

_SCHEDULES: dict[str, tuple[ScheduleFn, str]] = {}


def register(name: str, reference: str) -> Callable[[ScheduleFn], ScheduleFn]:
    def deco(fn: ScheduleFn) -> ScheduleFn:
        _SCHEDULES[name] = (fn, reference)
        return fn

    return deco


def available() -> list[str]:
    return sorted(_SCHEDULES)


def reference(name: str) -> str:
    return _SCHEDULES[name][1]


def _t(values: Sequence[float] | Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def _finish(process: Process, inner: Tensor) -> Tensor:
    """Put ``t_max`` first and append the clean endpoint 0."""
    inner = inner.clone()
    inner[0] = process.t_max
    return torch.cat([inner, torch.zeros(1, dtype=torch.float64)])


class _LevelSpace:
    """The space a noise-level ramp lives in: s = sigma / alpha, or k = s / (1 + s) when s(t_max)
    is infinite."""

    def __init__(self, process: Process):
        self.process = process
        self.lo = float(process.noise_level(_t(process.t_min)))
        self.hi = float(process.noise_level(_t(process.t_max)))
        self.bounded = not math.isfinite(self.hi)
        if self.bounded:
            self.lo, self.hi = self.lo / (1 + self.lo), 1.0
        if not 0 < self.lo < self.hi:
            raise ValueError(f"the noise-level range of {process!r} is empty")

    def to_t(self, levels: Tensor) -> Tensor:
        if self.bounded:
            levels = levels / (1 - levels)  # back to s; k = 1 gives s = inf, t = t_max
        return self.process.t_from_noise_level(levels)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


@register("uniform", "Song et al. 2021, DDIM (uniform in t; diffusers 'linspace')")
def uniform(process: Process, steps: int) -> Tensor:
    """``steps`` points evenly from t_max to t_min, then 0."""
    _check_steps(steps)
    return _finish(process, torch.linspace(process.t_max, process.t_min, steps, dtype=torch.float64))


@register("trailing", "Lin et al. 2024, Common Diffusion Noise Schedules are Flawed (Table 2)")
def trailing(process: Process, steps: int) -> Tensor:
    """Even spacing that ends at 0 itself: t_max, t_max (1 - 1/steps), ..., t_max / steps, 0."""
    _check_steps(steps)
    return torch.linspace(process.t_max, 0.0, steps + 1, dtype=torch.float64)


@register("leading", "Song et al. 2021, DDIM (diffusers 'leading' spacing, as Stable Diffusion 1.x)")
def leading(process: Process, steps: int, offset: int = 0) -> Tensor:
    """diffusers' leading spacing: t_min, t_min + 1/steps, ... reversed (never reaches t_max)."""
    _check_steps(steps)
    n = getattr(process, "num_train_steps", None)
    if n is not None:
        ratio = n // steps
        idx = torch.arange(steps - 1, -1, -1, dtype=torch.float64) * ratio + offset
        inner = (idx + 1) / n
    else:
        inner = process.t_min + torch.arange(steps - 1, -1, -1, dtype=torch.float64) / steps
    return torch.cat([inner, torch.zeros(1, dtype=torch.float64)])


@register("karras", "Karras et al. 2022, Elucidating the Design Space (Eq. 5)")
def karras(process: Process, steps: int, rho: float = 7.0) -> Tensor:
    """Noise levels ``(hi^(1/rho) + i/(n-1) (lo^(1/rho) - hi^(1/rho)))^rho``."""
    _check_steps(steps)
    space = _LevelSpace(process)
    lo, hi = space.lo, space.hi
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    levels = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return _finish(process, space.to_t(levels))


@register("logsnr", "Lu et al. 2022, DPM-Solver (uniform logSNR; k-diffusion 'exponential')")
def logsnr(process: Process, steps: int) -> Tensor:
    """Uniform in logSNR, i.e. log-uniform in the noise level."""
    return polynomial(process, steps, rho=1.0)


@register("polynomial", "k-diffusion's polyexponential schedule (Crowson 2022)")
def polynomial(process: Process, steps: int, rho: float = 1.0) -> Tensor:
    """log noise level follows ``ramp^rho`` from log(hi) to log(lo); rho = 1 is ``logsnr``."""
    _check_steps(steps)
    space = _LevelSpace(process)
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    levels = torch.exp(ramp * (math.log(space.hi) - math.log(space.lo)) + math.log(space.lo))
    return _finish(process, space.to_t(levels))


@register("explicit", "a grid given by the caller")
def explicit(process: Process, steps: int | None = None, t: Sequence[float] | Tensor | None = None,
             levels: Sequence[float] | Tensor | None = None) -> Tensor:
    """A grid of t (or of noise levels) given by the caller; 0 is appended if missing."""
    if (t is None) == (levels is None):
        raise ValueError("the explicit schedule takes exactly one of t=[...] or levels=[...]")
    grid = _t(t) if t is not None else process.t_from_noise_level(_t(levels))
    return validate(process, grid, steps)


@register("optimized", "Sabour et al. 2024, Align Your Steps (grid optimised for a model and sampler)")
def optimized(process: Process, steps: int | None = None, path: str | os.PathLike | None = None) -> Tensor:
    """A grid saved by :func:`optimize` (JSON)."""
    if path is None:
        raise ValueError("the optimized schedule needs path= to a JSON file written by schedules.optimize")
    return load(path, process, steps)


def validate(process: Process, grid: Tensor, steps: int | None = None) -> Tensor:
    """Check a grid (descending, within [0, t_max]) and append 0 if missing."""
    grid = _t(grid).flatten()
    if grid.numel() == 0 or bool(torch.isnan(grid).any()):
        raise ValueError("a grid of t must be a non-empty list of numbers")
    if float(grid[-1]) != 0.0:
        grid = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
    if grid.numel() < 2 or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"a grid of t must be strictly decreasing, got {grid.tolist()}")
    if float(grid[0]) > process.t_max + 1e-12:
        raise ValueError(f"a grid of t must start at or below t_max = {process.t_max}, got {float(grid[0])}")
    if steps is not None and grid.numel() != steps + 1:
        raise ValueError(f"the grid has {grid.numel() - 1} steps but steps={steps} was asked for")
    return grid


def get(name: str, process: Process, steps: int | None = None, **opts: Any) -> Tensor:
    """The grid of schedule ``name`` for ``process`` and ``steps``, with schedule options."""
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(available())}")
    fn = _SCHEDULES[name][0]
    params = inspect.signature(fn).parameters
    unknown = [k for k in opts if k not in params or k in ("process", "steps")]
    if unknown:
        valid = [p for p in params if p not in ("process", "steps")]
        raise ValueError(
            f"schedule {name!r} takes no option(s) {', '.join(unknown)}; its options are: "
            f"{', '.join(valid) or 'none'}"
        )
    return fn(process, steps, **opts)


def snap_to_training_steps(process: Process, grid: Tensor) -> Tensor:
    """Round a grid's points to the training indices of a discrete process (as diffusers does)."""
    n = getattr(process, "num_train_steps", None)
    if n is None:
        return grid
    inner = ((grid[:-1] * n - 1).round().clamp(0, n - 1) + 1) / n
    return torch.cat([torch.unique_consecutive(inner), grid[-1:]])


# --- save / load ------------------------------------------------------------------------------
def save(path: str | os.PathLike, grid: Tensor, process: Process, **meta: Any) -> None:
    """Write a grid as JSON (atomically), with the process it belongs to."""
    path = Path(path)
    payload = {"t": _t(grid).tolist(), "process": process.to_config(), **meta}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def load(path: str | os.PathLike, process: Process | None = None, steps: int | None = None) -> Tensor:
    """Read a grid saved by :func:`save`; refuses one made for another process."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no schedule file at {path}") from None
    if process is not None and payload.get("process") != process.to_config():
        raise ValueError(
            f"the schedule in {path} was made for {payload.get('process')}, not for {process.to_config()}"
        )
    grid = _t(payload["t"])
    if steps is not None and grid.numel() != steps + 1:
        raise ValueError(f"the schedule in {path} has {grid.numel() - 1} steps, not {steps}")
    return grid


# --- optimisation -------------------------------------------------------------------------------
def optimize(
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
    :func:`save` and use it as ``schedule="optimized"`` with ``path=`` or as an explicit grid.
    """
    from scipy.optimize import minimize

    from difflab import samplers

    _check_steps(steps)
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
    space = _LevelSpace(process)
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
        return _finish(process, torch.cat([t_inner.new_zeros(1), t_inner]))

    def error(grid: Tensor, batch: tuple[Tensor, Tensor]) -> float:
        if not bool((grid[1:] < grid[:-1]).all()):
            return 1e9
        out = samplers.sample(denoiser, batch[0], sampler, steps=steps, schedule=grid, **options)
        value = float(((out - batch[1]) ** 2).mean())
        return value if math.isfinite(value) else 1e9

    names = [init] if isinstance(init, str) else list(init)
    start = min((get(name, process, steps) for name in names), key=lambda g: error(g, fit))
    best_z, best_fit = params_of(start), error(start, fit)
    for _ in range(max(1, restarts)):
        result = minimize(lambda z: error(grid_of(z), fit), best_z, method="Nelder-Mead",
                          options={"maxfev": max_evals // max(1, restarts), "xatol": 1e-4, "fatol": 1e-14,
                                   "adaptive": True})
        if result.fun < best_fit:
            best_z, best_fit = result.x, result.fun
    tuned = grid_of(best_z)
    return tuned if error(tuned, check) < error(start, check) else start
