"""DPM-Solver family: exponential integrators in lambda = log(alpha / sigma).

All updates are written in ratio form: ``exp(-h) = (sigma_j alpha_i) / (alpha_j sigma_i)`` is 0,
not NaN, where alpha_i = 0. A step that starts where alpha = 0 (lambda = -inf) is first order: the
noise-prediction formulas divide by alpha there, and history at lambda = -inf has zero weight in
any polynomial in lambda. The step onto t = 0 is the final denoise.
"""

from __future__ import annotations

import math

import torch

from difflab.samplers.base import (
    Callback,
    DenoiseFn,
    Generator,
    Grid,
    ancestral_split,
    ddim_coefficients,
    evaluate,
    noise_like,
    register,
)

Tensor = torch.Tensor


def _eps(x: Tensor, d: Tensor, alpha: float, sigma: float) -> Tensor:
    return (x - alpha * d) / sigma


def _exp_neg_h(ai: float, si: float, aj: float, sj: float) -> float:
    return (sj * ai) / (aj * si)


# --- singlestep -------------------------------------------------------------------------------
@register("dpm_solver", "Lu et al. 2022, DPM-Solver (Algorithms 1-2, singlestep, noise prediction)")
def sample_dpm_solver(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                      callback: Callback = None, order: int = 3) -> Tensor:
    """DPM-Solver-1/2/3: each grid interval is one singlestep step of ``order`` evaluations
    (intermediate points at r = 1/2, or r = 1/3, 2/3, uniform in lambda)."""
    if order not in (1, 2, 3):
        raise ValueError(f"dpm_solver order must be 1, 2 or 3, got {order}")
    grid = Grid.build(denoiser.process, ts, x)
    fractions = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}[order]
    plan = []  # per step: list of (t, alpha, sigma) at intermediate points, or None for first order
    for i in range(grid.steps):
        if grid.is_final(i) or not math.isfinite(grid.lam[i]) or order == 1:
            plan.append(None)
            continue
        h = grid.lam[i + 1] - grid.lam[i]
        plan.append([grid.point(grid.lam[i] + r * h) for r in fractions])
    times = grid.times()
    inner = grid.times([p[0] for pts in plan if pts for p in pts] or [0.0])
    k = 0
    for i in range(grid.steps):
        j = i + 1
        ai, si, aj, sj = grid.step(i)
        d = evaluate(denoiser, x, times[i], i, callback)
        cx, cd = ddim_coefficients(ai, si, aj, sj)
        if plan[i] is None:
            x = cx * x + cd * d
            continue
        h = grid.lam[j] - grid.lam[i]
        e0 = _eps(x, d, ai, si)
        if order == 2:
            (_, a1, s1), r1 = plan[i][0], fractions[0]
            c1x, c1d = ddim_coefficients(ai, si, a1, s1)
            u = c1x * x + c1d * d
            e1 = _eps(u, denoiser(u, inner[k]), a1, s1)
            k += 1
            x = cx * x + cd * d - (sj / (2 * r1)) * math.expm1(h) * (e1 - e0)
        else:
            (_, a1, s1), (_, a2, s2) = plan[i]
            r1, r2 = fractions
            c1x, c1d = ddim_coefficients(ai, si, a1, s1)
            u1 = c1x * x + c1d * d
            diff1 = _eps(u1, denoiser(u1, inner[k]), a1, s1) - e0
            c2x, c2d = ddim_coefficients(ai, si, a2, s2)
            u2 = c2x * x + c2d * d - (s2 * r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * diff1
            diff2 = _eps(u2, denoiser(u2, inner[k + 1]), a2, s2) - e0
            k += 2
            x = cx * x + cd * d - (sj / r2) * (math.expm1(h) / h - 1) * diff2
    return x


@register("dpmpp_2s", "Lu et al. 2022, DPM-Solver++ (Algorithm 1, 2S; ancestral with eta > 0)",
          stochastic=True)
def sample_dpmpp_2s(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                    callback: Callback = None, eta: float = 0.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(2S): second-order singlestep in data prediction, midpoint in lambda
    (two evaluations per step). With eta > 0 it steps to sigma_down and adds noise (k-diffusion's
    dpmpp_2s_ancestral)."""
    grid = Grid.build(denoiser.process, ts, x)
    plan = []
    for i in range(grid.steps):
        ai, si, aj, sj = grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]
        sigma_down, noise = ancestral_split(ai, si, aj, sj, eta)
        mid = None
        if math.isfinite(grid.lam[i]) and sigma_down > 0:
            lam_down = math.log(aj) - math.log(sigma_down)
            mid = grid.point(0.5 * (grid.lam[i] + lam_down))
        plan.append((sigma_down, noise, mid))
    times = grid.times()
    t_mid = grid.times([p[2][0] if p[2] else 0.0 for p in plan])
    for i in range(grid.steps):
        j = i + 1
        ai, si, aj = grid.alpha[i], grid.sigma[i], grid.alpha[j]
        sigma_down, noise, mid = plan[i]
        d = evaluate(denoiser, x, times[i], i, callback)
        if mid is not None:
            _, am, sm = mid
            cmx, cmd = ddim_coefficients(ai, si, am, sm)
            u = cmx * x + cmd * d
            d = denoiser(u, t_mid[i])
        cx, cd = ddim_coefficients(ai, si, aj, sigma_down)
        x = cx * x + cd * d
        if noise > 0:
            x = x + (noise * s_noise) * noise_like(x, generator)
    return x


# --- multistep --------------------------------------------------------------------------------
THIRD_ORDER = {"exact": 2.0, "classic": 1.0}


def _multistep(denoiser: DenoiseFn, x: Tensor, ts, *, order: int, eta: float, s_noise: float,
               generator: Generator, callback: Callback, third_order: str = "exact") -> Tensor:
    """DPM-Solver++(2M) / (3M) and their SDE variants (Lu et al. 2022; Gonzalez et al. 2023 via
    k-diffusion). Order 2 uses the paper's midpoint form; order 3 the exact integral of the
    quadratic through the last three D in lambda (``third_order="exact"``), or the coefficient
    k-diffusion and diffusers use (``"classic"``: half the quadratic term, so the method is of
    second order, but with lower error at 10-40 steps on most problems; bench/samplers.py)."""
    if third_order not in THIRD_ORDER:
        raise ValueError(f"third_order must be one of {sorted(THIRD_ORDER)}, got {third_order!r}")
    quadratic = THIRD_ORDER[third_order]
    grid = Grid.build(denoiser.process, ts, x)
    times = grid.times()
    history: list[Tensor] = []
    for i in range(grid.steps):
        j = i + 1
        ai, si, aj, sj = grid.step(i)
        d = evaluate(denoiser, x, times[i], i, callback)
        history = [d, *history][:order]
        if grid.is_final(i):
            x = d
            continue
        ratio = _exp_neg_h(ai, si, aj, sj)  # exp(-h)
        h = grid.lam[j] - grid.lam[i]
        decay = ratio**eta if eta > 0 else 1.0  # exp(-eta h)
        h_eta = h * (1 + eta)
        one_minus = 1 - ratio * decay  # 1 - exp(-h_eta)
        x = ((sj / si) * decay) * x + (aj * one_minus) * d
        use = grid.finite_history(i, order) if math.isfinite(h) else 1
        use = min(use, len(history))
        if use >= 2:
            h1 = grid.lam[i] - grid.lam[i - 1]
            if order == 2:
                x = x + (aj * one_minus * 0.5 * h / h1) * (d - history[1])
            elif use == 2:
                phi2 = -one_minus / h_eta + 1
                x = x + (aj * phi2 * h / h1) * (d - history[1])
            else:
                h2 = grid.lam[i - 1] - grid.lam[i - 2]
                r0, r1 = h1 / h, h2 / h
                d1_0 = (d - history[1]) / r0
                d1_1 = (history[1] - history[2]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = -one_minus / h_eta + 1
                phi3 = phi2 / h_eta - 0.5
                x = x + (aj * phi2) * d1 - (quadratic * aj * phi3) * d2
        if eta > 0:
            x = x + (sj * math.sqrt(max(0.0, 1 - decay * decay)) * s_noise) * noise_like(x, generator)
    return x


@register("dpmpp_2m", "Lu et al. 2022, DPM-Solver++ (Algorithm 2, 2M)")
def sample_dpmpp_2m(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                    callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M): second-order multistep, one evaluation per step."""
    return _multistep(denoiser, x, ts, order=2, eta=0.0, s_noise=1.0, generator=generator, callback=callback)


@register("dpmpp_3m", "Lu et al. 2022, DPM-Solver++ (3M, third-order multistep)")
def sample_dpmpp_3m(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                    callback: Callback = None, third_order: str = "exact") -> Tensor:
    """DPM-Solver++(3M): third-order multistep, one evaluation per step (``third_order``: see
    :func:`_multistep`)."""
    return _multistep(denoiser, x, ts, order=3, eta=0.0, s_noise=1.0, generator=generator, callback=callback,
                      third_order=third_order)


@register("dpmpp_2m_sde", "Lu et al. 2022, DPM-Solver++ (2M SDE variant, Sec. 5)", stochastic=True)
def sample_dpmpp_2m_sde(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                        callback: Callback = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) for the reverse SDE: the deterministic part decays by exp(-eta h) and
    fresh noise of std sigma_j sqrt(1 - exp(-2 eta h)) is added."""
    return _multistep(denoiser, x, ts, order=2, eta=eta, s_noise=s_noise, generator=generator, callback=callback)


@register("dpmpp_3m_sde", "Lu et al. 2022, DPM-Solver++ (3M SDE variant, as in k-diffusion)", stochastic=True)
def sample_dpmpp_3m_sde(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                        callback: Callback = None, eta: float = 1.0, s_noise: float = 1.0,
                        third_order: str = "exact") -> Tensor:
    """Third-order multistep for the reverse SDE (see ``dpmpp_2m_sde`` and ``third_order`` in
    :func:`_multistep`)."""
    return _multistep(denoiser, x, ts, order=3, eta=eta, s_noise=s_noise, generator=generator, callback=callback,
                      third_order=third_order)
