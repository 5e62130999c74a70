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
from difflab.registry import Registry

Tensor = torch.Tensor
ScheduleFn = Callable[..., Tensor]

REGISTRY: Registry[ScheduleFn] = Registry("schedule")


def register(name: str, reference: str) -> Callable[[ScheduleFn], ScheduleFn]:
    return REGISTRY.register(name, reference)


def available() -> list[str]:
    return sorted(REGISTRY)


def reference(name: str) -> str:
    return REGISTRY.reference(name)


def _t(values: Sequence[float] | Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def finish_grid(process: Process, inner: Tensor) -> Tensor:
    """Put ``t_max`` first and append the clean endpoint 0."""
    inner = inner.clone()
    inner[0] = process.t_max
    return torch.cat([inner, torch.zeros(1, dtype=torch.float64)])


class LevelSpace:
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


def check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


@register("uniform", "Song et al. 2021, DDIM (uniform in t; diffusers 'linspace')")
def uniform(process: Process, steps: int) -> Tensor:
    """``steps`` points evenly from t_max to t_min, then 0."""
    check_steps(steps)
    return finish_grid(process, torch.linspace(process.t_max, process.t_min, steps, dtype=torch.float64))


@register("trailing", "Lin et al. 2024, Common Diffusion Noise Schedules are Flawed (Table 2)")
def trailing(process: Process, steps: int) -> Tensor:
    """Even spacing that ends at 0 itself: t_max, t_max (1 - 1/steps), ..., t_max / steps, 0."""
    check_steps(steps)
    return torch.linspace(process.t_max, 0.0, steps + 1, dtype=torch.float64)


@register("leading", "Song et al. 2021, DDIM (diffusers 'leading' spacing, as Stable Diffusion 1.x)")
def leading(process: Process, steps: int, offset: int = 0) -> Tensor:
    """diffusers' leading spacing: t_min, t_min + 1/steps, ... reversed (never reaches t_max)."""
    check_steps(steps)
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
    check_steps(steps)
    space = LevelSpace(process)
    lo, hi = space.lo, space.hi
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    levels = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return finish_grid(process, space.to_t(levels))


@register("logsnr", "Lu et al. 2022, DPM-Solver (uniform logSNR; k-diffusion 'exponential')")
def logsnr(process: Process, steps: int) -> Tensor:
    """Uniform in logSNR, i.e. log-uniform in the noise level."""
    return polynomial(process, steps, rho=1.0)


@register("polynomial", "k-diffusion's polyexponential schedule (Crowson 2022)")
def polynomial(process: Process, steps: int, rho: float = 1.0) -> Tensor:
    """log noise level follows ``ramp^rho`` from log(hi) to log(lo); rho = 1 is ``logsnr``."""
    check_steps(steps)
    space = LevelSpace(process)
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    levels = torch.exp(ramp * (math.log(space.hi) - math.log(space.lo)) + math.log(space.lo))
    return finish_grid(process, space.to_t(levels))


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
    """A grid saved by :func:`difflab.samplers.calibration.optimize_schedule` (JSON)."""
    if path is None:
        raise ValueError("the optimized schedule needs path= to a JSON file written by "
                         "difflab.samplers.calibration.optimize_schedule")
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
    fn = REGISTRY.get(name)
    params = inspect.signature(fn).parameters
    unknown = [k for k in opts if k not in params or k in ("process", "steps")]
    if unknown:
        valid = [p for p in params if p not in ("process", "steps")]
        raise ValueError(
            f"schedule {name!r} takes no option(s) {', '.join(unknown)}; its options are: "
            f"{', '.join(valid) or 'none'}"
        )
    # a named schedule is checked like an explicit grid: e.g. leading spacing with an offset can
    # run past t_max (diffusers accepts that and samples outside the training range)
    try:
        return validate(process, fn(process, steps, **opts), steps)
    except ValueError as err:
        raise ValueError(f"schedule {name!r} with steps={steps} and {opts or 'no options'}: {err}") from None


def truncate(grid: Tensor, t_start: float) -> Tensor:
    """The grid started at ``t_start`` (img2img, SDEdit): ``t_start`` itself, then the grid's points
    strictly below it. A run from strength s on a grid of N steps thus takes about s N steps with the
    schedule's own spacing; its first step starts exactly at ``t_start``, never at a neighbour."""
    grid = _t(grid)
    if not 0.0 < t_start <= float(grid[0]):
        raise ValueError(f"a grid can only be started within (0, {float(grid[0])}], got t = {t_start}")
    below = grid[grid < t_start - 1e-12]
    return torch.cat([torch.tensor([t_start], dtype=torch.float64), below])


def snap_to_training_steps(process: Process, grid: Tensor) -> Tensor:
    """Round a grid's points to the training indices of a discrete process as diffusers does:
    half to even (numpy's ``round``) on the index ``t n - 1``. The index is first rounded to 9
    decimals, so that an exact tie which float arithmetic turned into 499.49999999999994 is still
    a tie (diffusers computes its indices directly, where ties stay exact)."""
    n = getattr(process, "num_train_steps", None)
    if n is None:
        return grid
    index = torch.round(grid[:-1] * n - 1, decimals=9)
    inner = (index.round().clamp(0, n - 1) + 1) / n
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
    from difflab.files import read_json

    if not Path(path).is_file():
        raise FileNotFoundError(f"no schedule file at {path}")
    payload = read_json(path, "schedule")
    if process is not None and payload.get("process") != process.to_config():
        raise ValueError(
            f"the schedule in {path} was made for {payload.get('process')}, not for {process.to_config()}"
        )
    grid = _t(payload["t"])
    if steps is not None and grid.numel() != steps + 1:
        raise ValueError(f"the schedule in {path} has {grid.numel() - 1} steps, not {steps}")
    return grid
