"""Exact inversion: samplers whose every step can be undone in closed form.

* :class:`EDICT` (Wallace et al. 2023, "EDICT: Exact Diffusion Inversion via Coupled
  Transformations"): two coupled copies of the state, each stepped with the other's model output,
  then mixed with weight ``mix``; each of the four updates is affine in the state it changes, so the
  step runs backwards exactly.
* :class:`BDIA` (Zhang et al. 2024, "Exact Diffusion Inversion via Bi-directional Integration
  Approximation"): ``z_{k+1} = F_k(z_k) + gamma (z_{k-1} - B_k(z_k))``, where F and B are the DDIM
  steps from ``z_k`` forward to ``t_{k+1}`` and back to ``t_{k-1}`` with one model evaluation; given
  ``z_k`` and ``z_{k+1}`` the formula solves for ``z_{k-1}``.

Both keep two tensors as their state (:class:`ExactInversion`), so a round trip image -> state ->
image is exact up to floating-point rounding at any step count; sampling from fresh noise starts
both copies from it (EDICT) or takes a DDIM first step (BDIA). Every process and prediction works:
EDICT writes a step on the noise estimate (weight alpha_j / alpha_i on the state, which keeps
the step onto t = 0 invertible), except where alpha more than doubles over the step (near
alpha = 0): there its weights would be huge and cancel, and the step is written on the x0
estimate (weight sigma_j / sigma_i).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from difflab.editing.img2img import start_grid
from difflab.editing.inputs import EditError, check_image
from difflab.editing.inversion import undo_final_denoise
from difflab.samplers.base import Grid, ddim_coefficients

Tensor = torch.Tensor


@dataclass
class ExactInversion:
    """An exactly invertible sampler's state at the start of ``ts``: two tensors, kept in the
    precision the method computes in (see :class:`_Exact`), and the dtype of the image."""

    first: Tensor
    second: Tensor
    ts: Tensor
    dtype: torch.dtype = torch.float32


def work_dtype(x: Tensor) -> torch.dtype:
    """The dtype exact inversion keeps its two states in: float64 (but on MPS, which has none)."""
    return x.dtype if x.device.type == "mps" else torch.float64


class _InDtype:
    """A denoiser evaluated in the image's dtype on states kept in higher precision."""

    def __init__(self, denoiser: Any, dtype: torch.dtype):
        self.denoiser, self.process, self.dtype = denoiser, denoiser.process, dtype

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.denoiser(x.to(self.dtype), t.to(self.dtype), **cond).to(x.dtype)


class _Exact:
    """Shared by EDICT and BDIA. The two states and the affine updates between network evaluations
    are kept in float64, and the network runs in the image's dtype on the states rounded to it:
    inversion recomputes the same rounded inputs, so the network sees exactly what it saw while
    sampling, and the only rounding left is float64's (a float32 round trip then ends within ~1e-6
    even where the states grow to sigma = 80 or the run takes 1000 steps)."""

    name = ""

    def grid(self, denoiser: Any, like: Tensor, steps: int, schedule: str | Tensor | Sequence[float],
             strength: float, schedule_options: dict[str, Any] | None) -> Grid:
        ts = start_grid(denoiser.process, schedule, steps, strength, schedule_options)
        return Grid.build(denoiser.process, ts, like)

    def sample(self, denoiser: Any, start: Tensor | ExactInversion, steps: int = 50,
               schedule: str | Tensor | Sequence[float] = "uniform", *, cond: dict[str, Any] | None = None,
               strength: float = 1.0, schedule_options: dict[str, Any] | None = None) -> Tensor:
        """Sample from an :class:`ExactInversion` (its own grid) or from unit ``noise`` on a fresh grid."""
        if isinstance(start, ExactInversion):
            grid = Grid.build(denoiser.process, start.ts, start.first)
            pair, dtype = (start.first, start.second), start.dtype
        else:
            dtype = start.dtype
            x = start.to(work_dtype(start))
            grid = self.grid(denoiser, x, steps, schedule, strength, schedule_options)
            x = grid.sigma[0] * x
            pair = (x, x)
        with torch.no_grad():
            return self._forward(_InDtype(denoiser, dtype), grid, pair, cond or {}).to(dtype)

    def invert(self, denoiser: Any, image: Tensor, steps: int = 50,
               schedule: str | Tensor | Sequence[float] = "uniform", *, cond: dict[str, Any] | None = None,
               strength: float = 1.0, schedule_options: dict[str, Any] | None = None) -> ExactInversion:
        image = check_image(image)
        x = image.to(work_dtype(image))
        grid = self.grid(denoiser, x, steps, schedule, strength, schedule_options)
        with torch.no_grad():
            first, second = self._backward(_InDtype(denoiser, image.dtype), grid, x, cond or {})
        return ExactInversion(first, second, torch.tensor(grid.t, dtype=torch.float64), image.dtype)

    def _forward(self, denoiser: Any, grid: Grid, pair: tuple[Tensor, Tensor], cond: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def _backward(self, denoiser: Any, grid: Grid, image: Tensor, cond: dict[str, Any]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


@dataclass
class EDICT(_Exact):
    """EDICT with mixing weight ``mix``; ``None`` (the default) takes the paper's p = 0.93 up to ~50
    steps and ``1 - 1.1 N^-0.68`` beyond (0.97 at 200, 0.99 at 1000 steps). Why: the mixing shrinks
    the two copies' difference by p^2 per step, so inversion grows it, and any rounding in it, by
    1/p^2 per step: at p = 0.93 a 500-step round trip ends 1e10 from the image, even with float64
    states. The rule keeps that growth bounded (measured: exact to 3e-8 at 2000 steps)."""

    mix: float | None = None
    name = "edict"

    def __post_init__(self) -> None:
        if self.mix is not None and not 0 < self.mix < 1:
            raise EditError(f"EDICT's mix must lie in (0, 1) (the paper uses 0.93), got {self.mix}")

    def weight(self, steps: int) -> float:
        return self.mix if self.mix is not None else max(0.93, 1.0 - 1.1 * steps ** -0.68)

    @staticmethod
    def _step(grid: Grid, k: int) -> tuple[float, float, bool]:
        """(coefficient of the state, of the model output, whether the output is the noise estimate)."""
        ai, si, aj, sj = grid.step(k)
        if sj > 0 and aj > 2 * ai:  # alpha grows steeply (near alpha = 0): the noise form's weights would
            r, c = ddim_coefficients(ai, si, aj, sj)  # be huge and cancel, the x0 form's stay below 1
            return r, c, False
        if ai == 0:
            raise EditError("EDICT cannot take one step from pure noise (alpha = 0) straight to the image; "
                            "use 2 steps or more")
        return aj / ai, sj - aj * si / ai, True  # low noise and the step onto t = 0: the noise form

    @staticmethod
    def _output(denoiser: Any, z: Tensor, t: Tensor, grid: Grid, k: int, eps: bool, cond: dict[str, Any]) -> Tensor:
        d = denoiser(z, t, **cond)
        return (z - grid.alpha[k] * d) / grid.sigma[k] if eps else d

    def _forward(self, denoiser, grid, pair, cond):
        x, y = pair
        p, times = self.weight(grid.steps), grid.times()
        for k in range(grid.steps):
            a, b, eps = self._step(grid, k)
            x_mid = a * x + b * self._output(denoiser, y, times[k], grid, k, eps, cond)
            y_mid = a * y + b * self._output(denoiser, x_mid, times[k], grid, k, eps, cond)
            x = p * x_mid + (1 - p) * y_mid
            y = p * y_mid + (1 - p) * x
        return x

    def _backward(self, denoiser, grid, image, cond):
        x = y = image
        p, times = self.weight(grid.steps), grid.times()
        for k in range(grid.steps - 1, -1, -1):
            a, b, eps = self._step(grid, k)
            y_mid = (y - (1 - p) * x) / p
            x_mid = (x - (1 - p) * y_mid) / p
            y = (y_mid - b * self._output(denoiser, x_mid, times[k], grid, k, eps, cond)) / a
            x = (x_mid - b * self._output(denoiser, y, times[k], grid, k, eps, cond)) / a
        return x, y


@dataclass
class BDIA(_Exact):
    """BDIA-DDIM with weight ``gamma`` in (0, 1] (0 would be DDIM, which cannot be inverted this way).
    Its state is ``(z_0, z_1)``, the first two points of the run; the image is undone at the last
    noisy point by fixed-point iteration (``refine``) before the exact backward recursion. The
    recursion divides by gamma, so inversion grows rounding errors by about 1/gamma per step: with
    gamma = 0.5 a float32 round trip of 50 steps is lost (measured), gamma = 1 (the default) stays
    at rounding for 1000 steps. It needs 2 steps or more: one step is plain DDIM."""

    gamma: float = 1.0
    refine: int = 2
    name = "bdia"

    def __post_init__(self) -> None:
        if not 0 < self.gamma <= 1:
            raise EditError(f"BDIA's gamma must lie in (0, 1], got {self.gamma}")

    @staticmethod
    def _coefficients(grid: Grid, k: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """The DDIM maps from point k forward to k + 1 and back to k - 1, as (state, x0) weights."""
        ak, sk = grid.alpha[k], grid.sigma[k]
        return (ddim_coefficients(ak, sk, grid.alpha[k + 1], grid.sigma[k + 1]),
                ddim_coefficients(ak, sk, grid.alpha[k - 1], grid.sigma[k - 1]))

    def _forward(self, denoiser, grid, pair, cond):
        times = grid.times()
        z_prev, z = pair
        if z_prev is z:  # fresh noise: a DDIM first step gives the second point
            r, c = ddim_coefficients(*grid.step(0))
            z = r * z_prev + c * denoiser(z_prev, times[0], **cond)
        for k in range(1, grid.steps):
            (rf, cf), (rb, cb) = self._coefficients(grid, k)
            d = denoiser(z, times[k], **cond)
            z_prev, z = z, rf * z + cf * d + self.gamma * (z_prev - (rb * z + cb * d))
        return z

    def grid(self, *args: Any) -> Grid:
        grid = super().grid(*args)
        if grid.steps < 2:
            raise EditError("BDIA needs 2 steps or more: its one-step run is DDIM, which cannot be inverted exactly "
                            "(EDICT can, where alpha(t_start) > 0)")
        return grid

    def _backward(self, denoiser, grid, image, cond):
        times = grid.times()
        n = grid.steps
        z_next = image
        z = undo_final_denoise(denoiser, image, grid.t[n - 1], cond, self.refine)
        for k in range(n - 1, 0, -1):
            (rf, cf), (rb, cb) = self._coefficients(grid, k)
            d = denoiser(z, times[k], **cond)
            z_next, z = z, rb * z + cb * d + (z_next - (rf * z + cf * d)) / self.gamma
        return z, z_next
