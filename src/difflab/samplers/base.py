"""What every sampler shares: the grid's per-step constants, the registry, noise, small helpers.

Semantics kept by every sampler: ``ts`` is a descending grid ending at 0; ``x`` is the state at
``ts[0]``; a step between two non-zero points follows the sampler's method; the step onto 0 is the
final denoise ``D(x, t_last)`` (one evaluation, no extrapolation). Editing runs samplers on two
other kinds of grid (a :class:`PartialGrid`): a descending piece that stops
above 0 (RePaint's resampling), and an ascending one that integrates the ODE back up from
``t > 0`` toward more noise (inversion). Per-step constants are computed
once, in float64 on the host, before the loop, so the loop itself does no host synchronisation.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from difflab.processes import Process
from difflab.registry import Registry

Tensor = torch.Tensor
DenoiseFn = Callable[[Tensor, Tensor], Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[int, Tensor, Tensor, Tensor], None] | None


@dataclass(frozen=True)
class Grid:
    """Host-side per-point constants of a grid of t: alpha, sigma, lambda = log(alpha / sigma)."""

    process: Process
    t: tuple[float, ...]
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    lam: tuple[float, ...]  # -inf where alpha = 0, +inf where sigma = 0
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def build(cls, process: Process, ts: Tensor | Sequence[float], like: Tensor) -> Grid:
        partial = isinstance(ts, PartialGrid)
        t = torch.as_tensor(ts.t if partial else ts, dtype=torch.float64).detach().cpu().flatten()
        down = t.numel() >= 2 and bool((t[1:] < t[:-1]).all())
        up = t.numel() >= 2 and bool((t[1:] > t[:-1]).all()) and float(t[0]) > 0
        if not ((down and (partial or float(t[-1]) == 0.0)) or (partial and up)):
            raise ValueError(
                f"a sampling grid must be strictly decreasing and end at 0, got {t.tolist()[:8]}...; "
                "build it with difflab.schedules"
            )
        a = process.alpha(t)
        s = process.sigma(t)
        return cls(process, tuple(t.tolist()), tuple(a.tolist()), tuple(s.tolist()),
                   tuple(_lam(x, y) for x, y in zip(a.tolist(), s.tolist(), strict=True)),
                   like.device, like.dtype)

    def __len__(self) -> int:
        return len(self.t)

    @property
    def steps(self) -> int:
        return len(self.t) - 1

    def times(self, values: Sequence[float] | None = None) -> Tensor:
        """Times as one device tensor, built once before the loop (indexing it does not sync)."""
        return torch.tensor(self.t if values is None else list(values), device=self.device, dtype=self.dtype)

    def point(self, lam: float) -> tuple[float, float, float]:
        """(t, alpha, sigma) of the point with log(alpha / sigma) = lam."""
        t = self.process.t_from_logsnr(torch.tensor(2.0 * lam, dtype=torch.float64))
        return float(t), float(self.process.alpha(t)), float(self.process.sigma(t))

    def point_at_level(self, level: float) -> tuple[float, float, float]:
        """(t, alpha, sigma) of the point with noise level sigma / alpha = level."""
        return self.point(-math.log(level))

    def step(self, i: int) -> tuple[float, float, float, float]:
        """(alpha_i, sigma_i, alpha_{i+1}, sigma_{i+1}): the two ends of step i."""
        return self.alpha[i], self.sigma[i], self.alpha[i + 1], self.sigma[i + 1]

    def is_final(self, i: int) -> bool:
        """Whether the step from i lands on clean data (the final denoise)."""
        return self.sigma[i + 1] == 0.0

    def finite_history(self, i: int, order: int) -> int:
        """The order a multistep method can use at step i: history points at alpha = 0 have
        lambda = -inf and drop out of any polynomial in lambda (their weight is zero)."""
        k = 1
        while k < order and i - k >= 0 and math.isfinite(self.lam[i - k]):
            k += 1
        return k


@dataclass(frozen=True)
class PartialGrid:
    """A grid of t that need not end at 0 and may ascend (editing: RePaint's pieces, inversion);
    passed to a sampler function in place of ``ts``. ``sample()`` never makes one."""

    t: tuple[float, ...]

    @classmethod
    def of(cls, ts: Tensor | Sequence[float]) -> PartialGrid:
        return cls(tuple(torch.as_tensor(ts, dtype=torch.float64).flatten().tolist()))


def _lam(alpha: float, sigma: float) -> float:
    if alpha == 0.0:
        return -math.inf
    if sigma == 0.0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def ddim_coefficients(ai: float | Tensor, si: float | Tensor, aj: float | Tensor,
                      sj: float | Tensor) -> tuple[float | Tensor, float | Tensor]:
    """First-order step ``x_j = (sigma_j / sigma_i) x_i + (alpha_j - alpha_i sigma_j / sigma_i) D``:
    DDIM (Song et al. 2021), equal to Euler in the noise level and to DPM-Solver(++)-1. Finite at
    alpha = 0 and at sigma_j = 0 (where it returns D). Floats, or per-sample tensors (distillation)."""
    r = sj / si
    return r, aj - ai * r


def ancestral_split(ai: float, si: float, aj: float, sj: float, eta: float) -> tuple[float, float]:
    """(sigma_down, noise std) of an ancestral step i -> j for any process.

    The DDPM posterior adds noise of std ``sigma_j sqrt(1 - exp(-2h))`` (h the logSNR/2 step);
    ``eta`` scales it (DDIM's eta, k-diffusion's ancestral eta); the deterministic part steps to the
    virtual point (alpha_j, sigma_down) with ``sigma_down^2 + noise^2 = sigma_j^2``.
    """
    if eta == 0.0 or sj == 0.0:
        return sj, 0.0
    ratio = (sj * ai) / (aj * si)  # exp(-h), 0 when alpha_i = 0
    noise = min(sj, eta * sj * math.sqrt(max(0.0, 1.0 - ratio * ratio)))
    return math.sqrt(max(0.0, sj * sj - noise * noise)), noise


def noise_like(x: Tensor, generator: Generator) -> Tensor:
    """Standard normal noise shaped like x. A list of generators draws sample i from generator i,
    so a sample's noise depends on its own seed only (batch invariance)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one per sample")
        return torch.stack([
            torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device)
            for g in generator
        ])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def resolve_variable(grid: Grid, variable: str) -> str:
    """The ODE form a Runge-Kutta or linear-multistep sampler integrates in.

    ``noise_level``: y = x / alpha against k = sigma / alpha (Karras et al. 2022, the EDM form).
    ``flow``: y = x / (alpha + sigma) against k = sigma / (alpha + sigma) (every process viewed as
    a rectified flow; finite at alpha = 0). Both read ``dy/dk = (y - D) / k``. ``auto`` takes
    ``noise_level`` unless the grid reaches alpha = 0.
    """
    if variable == "auto":
        return "noise_level" if min(grid.alpha) > 0 else "flow"
    if variable not in ("noise_level", "flow"):
        raise ValueError(f"unknown ODE variable {variable!r}; choose 'auto', 'noise_level' or 'flow'")
    if variable == "noise_level" and min(grid.alpha) == 0:
        raise ValueError("the noise-level ODE form is infinite at alpha = 0; use variable='flow'")
    return variable


def coords(variable: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(scale c, level k) of the point (alpha, sigma) in the ODE form ``variable``."""
    if variable == "flow":
        c = 1.0 / (alpha + sigma)
        return c, sigma * c
    return 1.0 / alpha, sigma / alpha


def level_point(grid: Grid, variable: str, level: float) -> tuple[float, float, float]:
    """(t, alpha, sigma) of the point at ODE level ``level`` in the form ``variable``."""
    if variable == "flow":
        return grid.point_at_level(level / (1 - level))
    return grid.point_at_level(level)


def churn_points(grid: Grid, s_churn: float, s_tmin: float, s_tmax: float
                 ) -> list[tuple[float, float, float, float]]:
    """EDM's stochastic churn (Karras et al. 2022, Algorithm 2): per step (t_hat, alpha_hat, sigma_hat,
    std of the noise added in VE form), the noise level raised by gamma = min(s_churn / steps,
    sqrt(2) - 1) on levels within [s_tmin, s_tmax]. Deviation from the algorithm, on purpose: no
    churn on the final step to sigma = 0, nor where the raised level lies beyond the process's
    t_max (a VP or flow process has no noise level above its t = 1)."""
    gamma0 = min(s_churn / grid.steps, math.sqrt(2) - 1) if s_churn > 0 else 0.0
    t_max = torch.tensor(grid.process.t_max, dtype=torch.float64)
    top_level = float(grid.process.noise_level(t_max)) if float(grid.process.alpha(t_max)) > 0 else math.inf
    out = []
    for i in range(grid.steps):
        a, s = grid.alpha[i], grid.sigma[i]
        level = s / a if a > 0 else math.inf
        if gamma0 > 0 and math.isfinite(level) and s_tmin <= level <= s_tmax and grid.sigma[i + 1] > 0:
            level_hat = level * (1 + gamma0)
            # compared as levels: the point at a level past t_max is clamped to t_max, whose level
            # is lower than level_hat, so a t comparison would add noise the denoiser is not told of
            if level_hat <= top_level:
                t_hat, a_hat, s_hat = grid.point_at_level(level_hat)
                out.append((t_hat, a_hat, s_hat, math.sqrt(level_hat**2 - level**2)))
                continue
        out.append((grid.t[i], a, s, 0.0))
    return out


def churn(x: Tensor, alpha: float, alpha_hat: float, extra: float, s_noise: float,
          generator: Generator) -> Tensor:
    """Add noise to move x from its level to the raised level (in x-space: rescale alpha too)."""
    if extra == 0.0:
        return x
    return (alpha_hat / alpha) * x + (alpha_hat * extra * s_noise) * noise_like(x, generator)


def churned_denoise(denoiser: Callable[[Tensor, Tensor], Tensor], x: Tensor, i: int, grid: Grid,
                    hats: list[tuple[float, float, float, float]], t_hat: Tensor, s_noise: float,
                    generator: Generator, callback: Callback) -> tuple[Tensor, Tensor]:
    """Step ``i`` of a churned sampler: raise x to its step's churned level (:func:`churn_points`),
    then denoise it there (reported to the callback). Returns (raised x, its denoised estimate)."""
    _, a_hat, _, extra = hats[i]
    x = churn(x, grid.alpha[i], a_hat, extra, s_noise, generator)
    d = evaluate(denoiser, x, t_hat[i], i, callback)
    return x, d


# --- registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerInfo:
    name: str
    fn: Callable[..., Tensor]
    reference: str
    stochastic: bool
    options: dict[str, Any]


REGISTRY: Registry[SamplerInfo] = Registry("sampler")
_CORE_ARGS = ("denoiser", "x", "ts", "grid", "generator", "callback")


def register(name: str, reference: str, *, stochastic: bool = False) -> Callable:
    """Register a sampler function under ``name``; its keyword options become its valid options."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        params = inspect.signature(fn).parameters
        options = {k: p.default for k, p in params.items() if k not in _CORE_ARGS}
        REGISTRY.add(name, SamplerInfo(name, fn, reference, stochastic, options), reference)
        return fn

    return deco


def get(name: str) -> SamplerInfo:
    return REGISTRY.get(name)


def available() -> list[str]:
    return sorted(REGISTRY)


#: the options that make a stochastic sampler draw noise, and their deterministic values
NOISE_OPTIONS = {"eta": 0.0, "s_churn": 0.0}


def deterministic(sampler: str, options: dict[str, Any] | None = None) -> bool:
    """Whether the sampler with these options draws no noise (DDIM with eta = 0, Euler or Heun
    without churn, every ODE solver), so that its run can be inverted."""
    info = get(sampler)
    if not info.stochastic:
        return True
    noise = [k for k in info.options if k in NOISE_OPTIONS]
    merged = {**info.options, **(options or {})}
    return bool(noise) and all(merged[k] == NOISE_OPTIONS[k] for k in noise)


def check_options(name: str, opts: dict[str, Any]) -> None:
    info = get(name)
    unknown = [k for k in opts if k not in info.options]
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in info.options.items()) or "none"
        raise ValueError(f"sampler {name!r} takes no option(s) {', '.join(unknown)}; its options are: {valid}")


def emit(callback: Callback, i: int, t: Tensor, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(i, t, x, denoised)


def evaluate(denoiser: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, i: int,
             callback: Callback) -> Tensor:
    """The denoised estimate at step ``i`` (state x at time t), reported to the callback."""
    d = denoiser(x, t)
    emit(callback, i, t, x, d)
    return d
