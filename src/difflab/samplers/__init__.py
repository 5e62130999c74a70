"""Samplers: stateless functions ``sample_x(denoiser, x, ts, *, generator, callback, **opts)``.

Each is registered by name (``available()``); :func:`sample` is the public entry point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from difflab import schedules
from difflab.samplers import adaptive, bespoke, dpm_solver, first_order, multistep, restart, runge_kutta, unipc  # noqa: F401
from difflab.samplers.base import (
    Generator,
    Grid,
    PartialGrid,
    SamplerInfo,
    available,
    check_options,
    deterministic,
    get,
    noise_like,
    register,
)

Tensor = torch.Tensor

__all__ = ["Grid", "PartialGrid", "SamplerInfo", "SamplerSpec", "available", "deterministic", "get", "noise_like",
           "reference", "register", "run", "sample"]


def reference(name: str) -> str:
    """The paper a sampler implements."""
    return get(name).reference


class _Bound:
    """A denoiser with conditioning bound and its evaluations counted (no host sync)."""

    def __init__(self, denoiser: Any, cond: dict[str, Any]):
        self.denoiser, self.cond, self.evals = denoiser, cond, 0
        self.process = denoiser.process

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.evals += 1
        return self.denoiser(x, t, **self.cond)


def sample(
    denoiser: Any,
    noise: Tensor,
    sampler: str = "dpmpp_2m",
    steps: int = 10,
    schedule: str | Tensor | Sequence[float] = "karras",
    *,
    generator: Generator = None,
    callback: Any = None,
    cond: dict[str, Any] | None = None,
    schedule_options: dict[str, Any] | None = None,
    return_nfe: bool = False,
    **options: Any,
) -> Tensor | tuple[Tensor, int]:
    """Draw samples: ``x_T = sigma(t_max) * noise``, then the sampler walks the schedule to t = 0.

    ``schedule`` is a schedule name (``difflab.schedules.available()``) or an explicit grid of t.
    ``options`` go to the sampler (an unknown one raises, listing the valid ones); ``cond`` to
    every denoiser call. ``generator`` may be a list with one generator per sample, which makes
    stochastic samplers batch-invariant. With ``return_nfe`` the number of network evaluations
    actually made is returned too.
    """
    process = _process_of(denoiser)
    if not isinstance(noise, Tensor) or noise.ndim < 1:
        raise ValueError("noise must be a tensor of shape (batch, ...)")
    ts = grid_of(process, schedule, steps, schedule_options)
    x = float(process.sigma(torch.tensor(float(ts[0]), dtype=torch.float64))) * noise
    return run(denoiser, x, ts, sampler, generator=generator, callback=callback, cond=cond, return_nfe=return_nfe,
               **options)


def _process_of(denoiser: Any) -> Any:
    process = getattr(denoiser, "process", None)
    if process is None:
        raise TypeError("sampling needs a difflab Denoiser (an object with .process); "
                        "wrap a function with difflab.Denoiser.from_fn")
    return process


def grid_of(process: Any, schedule: str | Tensor | Sequence[float], steps: int,
            schedule_options: dict[str, Any] | None = None) -> Tensor:
    """The checked grid of t of a schedule name (with its options) or of an explicit grid."""
    if isinstance(schedule, str):
        return schedules.get(schedule, process, steps, **(schedule_options or {}))
    return schedules.validate(process, torch.as_tensor(schedule, dtype=torch.float64))


def run(denoiser: Any, x: Tensor, ts: Tensor | PartialGrid, sampler: str = "dpmpp_2m", *, generator: Generator = None,
        callback: Any = None, cond: dict[str, Any] | None = None, return_nfe: bool = False,
        **options: Any) -> Tensor | tuple[Tensor, int]:
    """Run a sampler from the state ``x`` at ``ts[0]`` along the grid ``ts`` (no noise is drawn):
    what :func:`sample` does after it scales the noise, and what editing (img2img from a noised
    image, inversion on an ascending :class:`PartialGrid`) calls directly."""
    info = get(sampler)
    check_options(sampler, options)
    _process_of(denoiser)
    bound = _Bound(denoiser, cond or {})
    with torch.no_grad():
        out = info.fn(bound, x, ts, generator=generator, callback=callback, **options)
    return (out, bound.evals) if return_nfe else out


@dataclass(frozen=True)
class SamplerSpec:
    """A way to sample, as data: sampler name, steps, schedule name (or an explicit grid of t) with
    its options, and the sampler's options. Checked when made, so a recipe or pipeline with an
    unknown sampler, option or schedule fails at once, not after training; ``to_config`` /
    ``from_config`` round-trip it through JSON; ``spec(denoiser, noise, ...)`` samples."""

    name: str = "dpmpp_2m"
    steps: int = 20
    schedule: str | tuple[float, ...] = "karras"
    options: dict[str, Any] = field(default_factory=dict)
    schedule_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_options(self.name, self.options)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if isinstance(self.schedule, str):
            schedules.REGISTRY.get(self.schedule)
        else:
            object.__setattr__(self, "schedule", tuple(float(v) for v in self.schedule))

    def to_config(self) -> dict[str, Any]:
        schedule = self.schedule if isinstance(self.schedule, str) else list(self.schedule)
        return {"name": self.name, "steps": self.steps, "schedule": schedule, "options": dict(self.options),
                "schedule_options": dict(self.schedule_options)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SamplerSpec:
        unknown = sorted(set(config) - {"name", "steps", "schedule", "options", "schedule_options"})
        if unknown:
            raise ValueError(f"a sampler spec has no field(s) {', '.join(unknown)}; its fields are name, steps, "
                             "schedule, options, schedule_options")
        return cls(**config)

    def __call__(self, denoiser: Any, noise: Tensor, **kw: Any) -> Tensor | tuple[Tensor, int]:
        return sample(denoiser, noise, self.name, self.steps, self.schedule,
                      schedule_options=self.schedule_options or None, **self.options, **kw)
