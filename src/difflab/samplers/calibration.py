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


_ONE_PER_POINT = ("bespoke coefficients come from samplers with one evaluation per grid point "
                  "(ddim, dpmpp_2m, deis, ipndm, unipc)")


class _Probe:
    """A stand-in denoiser whose k-th output is the k-th basis vector after x_T's: run on the state
    ``e_0``, a sampler that is linear in its inputs computes its own coefficients on (x_T, D_0, ...),
    and the inputs it evaluates at are recorded with their times."""

    def __init__(self, process: Any, size: int):
        self.process, self.size = process, size
        self.inputs: list[Tensor] = []
        self.times: list[float] = []

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        k = len(self.inputs)
        if k + 1 >= self.size:
            raise ValueError(f"the sampler evaluates the denoiser more often than once per step; {_ONE_PER_POINT}")
        self.inputs.append(x.clone())
        self.times.append(float(t))
        out = torch.zeros_like(x)
        out[..., k + 1] = 1.0
        return out


def bespoke_rows(process: Any, sampler: str, grid: Tensor, options: dict[str, Any] | None = None
                 ) -> list[list[float]]:
    """The coefficients of a deterministic one-evaluation-per-step sampler on ``grid``, written as a
    bespoke solver's rows (:func:`difflab.samplers.bespoke.rollout`): the starting point of
    :func:`fit_bespoke`. A sampler that is not linear in its inputs (thresholding) gives rows that do
    not reproduce it; :func:`tune` checks that they do."""
    from difflab import samplers

    steps = grid.numel() - 1
    probe = _Probe(process, steps + 1)
    start = torch.zeros(1, steps + 1, dtype=torch.float64)
    start[0, 0] = 1.0
    out = samplers.run(probe, start, grid, sampler, **(options or {}))
    if len(probe.times) != steps or any(abs(a - b) > 1e-12 for a, b in zip(probe.times, grid[:-1].tolist(),
                                                                              strict=True)):
        raise ValueError(f"{sampler!r} evaluated the denoiser at t = {probe.times[:6]}..., not once at each grid point "
                         f"{grid[:-1].tolist()[:6]}...; {_ONE_PER_POINT}")
    alpha, sigma = process.alpha(grid).tolist(), process.sigma(grid).tolist()
    rows = []
    for p, state in enumerate([*probe.inputs[1:], out], start=1):
        c = state[0].tolist()
        rows.append([c[0] * sigma[0] / sigma[p] if sigma[p] > 0 else 0.0, *(v / alpha[p] for v in c[1:p + 1])])
    return rows


def fit_bespoke(
    denoiser: Any,
    grid: Tensor,
    rows: list[list[float]],
    noise: Tensor,
    reference: Tensor,
    *,
    iterations: int = 200,
    learn_times: bool = False,
    slack: float = 0.0,
    cond: dict[str, Tensor] | None = None,
) -> tuple[Tensor, list[list[float]]]:
    """Fit a bespoke solver to the endpoint error against ``reference`` from ``noise``, starting
    from ``grid`` and ``rows``: every coefficient and, with ``learn_times``, the interior times too
    (Shaul et al. 2024, BNS: there Adam on a PSNR loss, here L-BFGS on the mean squared error),
    through the model itself. Returns the grid and the rows. On the d = 64 mixtures learning the
    times as well helped at some step counts and hurt at others, so it is off by default.

    ``slack`` > 0 is LD3's soft surrogate (Tong et al. 2024): each calibration sample may start from
    any point within ``slack * |x_T|`` of its own, so a sample the solver cannot follow (one near the
    boundary between two modes) does not bend the coefficients for all the others."""
    from difflab.samplers.bespoke import rollout

    process = denoiser.process
    t_max = float(grid[0])
    x = float(process.sigma(grid[:1])) * noise
    params = [torch.tensor(r, dtype=torch.float64, requires_grad=True) for r in rows]
    # interior times as softmax increments of t from t_max down to 0: ordered whatever the values
    logits = (grid[:-1] - grid[1:]).clamp_min(1e-9).log().clone().requires_grad_(learn_times)
    bound = (lambda xs, t: denoiser(xs, t, **cond)) if cond else denoiser
    shift = torch.zeros_like(x, requires_grad=slack > 0)
    radius = slack * x.flatten(1).norm(dim=1).reshape(-1, *[1] * (x.ndim - 1))

    def start() -> Tensor:
        if slack <= 0:
            return x
        norm = shift.flatten(1).norm(dim=1).reshape(radius.shape)
        return x + shift * torch.clamp(radius / norm.clamp_min(1e-30), max=1.0)  # projected onto the ball

    def times_of(z: Tensor) -> Tensor:
        steps = torch.softmax(z, 0) * t_max
        return torch.cat([steps.new_tensor([t_max]), t_max - torch.cumsum(steps, 0)[:-1], steps.new_zeros(1)])

    def loss_of() -> Tensor:
        t = times_of(logits) if learn_times else grid
        out = rollout(bound, start(), t.to(x.dtype).to(x.device), process.alpha(t), process.sigma(t), params)
        return ((out - reference) ** 2).mean().double()

    trained = [*params, *([logits] if learn_times else []), *([shift] if slack > 0 else [])]
    optimizer = torch.optim.LBFGS(trained, lr=1.0, max_iter=iterations, history_size=50,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-16)

    def closure() -> Tensor:
        with torch.enable_grad():
            loss = loss_of()
            grads = torch.autograd.grad(loss, trained)
        for p, gr in zip(trained, grads, strict=True):
            p.grad = gr
        return loss.detach()

    optimizer.step(closure)
    fitted_grid = times_of(logits.detach()) if learn_times else grid
    return fitted_grid, [p.detach().tolist() for p in params]


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
    bespoke: bool = False,
    bespoke_iterations: int = 200,
    cond: dict[str, Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Tuned:
    """Calibrate ``sampler`` at ``steps`` evaluations for one model: the grid of t
    (:func:`optimize_schedule`, Align-Your-Steps-like), then, for samplers in :data:`TUNABLE`, the
    per-step coefficients on that grid — for UniPC the dynamic-compensation ratios of DC-Solver
    (Zhao et al. 2024), here fitted jointly to the endpoint error by Nelder-Mead instead of step by
    step to a reference trajectory. Both stages accept a result only if it also lowers the error
    on the half of the calibration batch it was not fitted on. With ``bespoke``, the result (a
    one-evaluation-per-step sampler) is then rewritten as a bespoke solver (:func:`bespoke_rows`)
    and every coefficient fitted through the model (:func:`fit_bespoke`, Shaul et al. 2024), kept
    under the same held-out rule; the spec is then sampler ``bns``. Deterministic for a given
    batch. ``cond`` (one row per sample) goes to the denoiser with its samples."""
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

    def run(grid: Tensor, opts: dict[str, Any], part: slice, name: str = sampler) -> Tensor:
        return samplers.sample(denoiser, noise[part], name, schedule=grid,
                               cond={k: v[part] for k, v in (cond or {}).items()}, **opts)

    def mse(grid: Tensor, opts: dict[str, Any], part: slice, name: str = sampler) -> float:
        out = run(grid, opts, part, name)
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
    name = sampler
    if bespoke:
        say(f"bespoke coefficients at {steps} steps")
        rows = bespoke_rows(denoiser.process, sampler, grid, options)
        fit, check = slice(0, half), slice(half, None)
        base = run(grid, options, fit)
        again = run(grid, {"coefficients": rows}, fit, "bns")
        if not torch.allclose(again, base, rtol=1e-4, atol=1e-4 * float(base.abs().max())):
            raise ValueError(f"{sampler!r} with {options} is not linear in its inputs, so it has no bespoke form; "
                             "tune a plain ODE sampler (unipc, dpmpp_2m, deis, ddim) with bespoke=True")
        cond_fit = {k: v[fit] for k, v in (cond or {}).items()} or None
        _, fitted = fit_bespoke(denoiser, grid, rows, noise[fit], reference[fit], iterations=bespoke_iterations,
                                cond=cond_fit)
        if mse(grid, {"coefficients": fitted}, check, "bns") < mse(grid, options, check):
            name, options = "bns", {"coefficients": fitted}
    tuned_mse = mse(grid, options, whole, name)
    spec = samplers.SamplerSpec(name, steps, tuple(grid.tolist()), options)
    return Tuned(spec, start_mse, tuned_mse, time.perf_counter() - started)
