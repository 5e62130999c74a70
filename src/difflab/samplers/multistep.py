"""Linear multistep samplers: LMS, PLMS / PNDM, iPNDM, gradient estimation and DEIS (tAB)."""

from __future__ import annotations

import numpy as np
import torch
from numpy.polynomial import polynomial as npoly

from difflab.samplers.base import (
    Callback,
    DenoiseFn,
    Generator,
    Grid,
    coords,
    ddim_coefficients,
    evaluate,
    register,
    resolve_variable,
)

Tensor = torch.Tensor

#: Adams-Bashforth coefficients for equal steps, newest first (orders 1-4)
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _check_order(name: str, order: int, highest: int) -> None:
    if order not in range(1, highest + 1):
        raise ValueError(f"{name} order must be between 1 and {highest}, got {order}")


def lagrange_integrals(nodes: list[float], a: float, b: float) -> list[float]:
    """Exact integrals over [a, b] of the Lagrange basis polynomials on ``nodes``."""
    out = []
    for k, xk in enumerate(nodes):
        others = [xm for m, xm in enumerate(nodes) if m != k]
        poly = npoly.polyfromroots(others) / np.prod([xk - xm for xm in others]) if others else np.array([1.0])
        antideriv = npoly.polyint(poly)
        out.append(float(npoly.polyval(b, antideriv) - npoly.polyval(a, antideriv)))
    return out


def _adams_bashforth(denoiser: DenoiseFn, x: Tensor, grid: Grid, cs: list[tuple[float, float]],
                     weights: list[list[float]], order: int, callback: Callback) -> Tensor:
    """Linear multistep on ``dy/dk = (y - D) / k`` in the coordinates ``cs`` = (c, k) per grid point
    (``y = c x``): step i adds ``sum_m weights[i][m] * slope_{i-m}`` over the last ``order`` slopes."""
    times = grid.times()
    slopes: list[Tensor] = []
    for i in range(grid.steps):
        d = evaluate(denoiser, x, times[i], i, callback)
        if grid.is_final(i):
            x = d
            continue
        ci, ki = cs[i]
        y = ci * x
        slopes = [(y - d) / ki, *slopes][:order]
        for w, slope in zip(weights[i], slopes, strict=False):
            y = y + w * slope
        x = y / cs[i + 1][0]
    return x


@register("lms", "Crowson 2022, k-diffusion (linear multistep, coefficients integrated exactly)")
def sample_lms(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
               callback: Callback = None, order: int = 4, variable: str = "auto") -> Tensor:
    """Variable-step Adams-Bashforth on ``dy/dk = (y - D) / k``: the derivative history is
    interpolated by a polynomial in k and integrated exactly over each step."""
    _check_order("lms", order, 4)
    grid = Grid.build(denoiser.process, ts, x)
    cs = [coords(resolve_variable(grid, variable), a, s) for a, s in zip(grid.alpha, grid.sigma, strict=True)]
    weights = [[] if grid.is_final(i) else
               lagrange_integrals([cs[i - k][1] for k in range(min(order, i + 1))], cs[i][1], cs[i + 1][1])
               for i in range(grid.steps)]
    return _adams_bashforth(denoiser, x, grid, cs, weights, order, callback)


@register("ipndm", "Zhang & Chen 2023, DEIS (improved PNDM, Sec. 4); k-diffusion's sample_ipndm")
def sample_ipndm(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                 callback: Callback = None, order: int = 4, variable: str = "auto") -> Tensor:
    """Fixed-coefficient Adams-Bashforth on ``dy/dk = (y - D) / k`` with lower-order warm-up."""
    _check_order("ipndm", order, 4)
    grid = Grid.build(denoiser.process, ts, x)
    cs = [coords(resolve_variable(grid, variable), a, s) for a, s in zip(grid.alpha, grid.sigma, strict=True)]
    weights = [[] if grid.is_final(i) else
               [(cs[i + 1][1] - cs[i][1]) * c for c in ADAMS_BASHFORTH[min(order, i + 1)]]
               for i in range(grid.steps)]
    return _adams_bashforth(denoiser, x, grid, cs, weights, order, callback)


@register("gradient_estimation", "Permenter & Yuan 2024, Interpreting and Improving Diffusion Models from an "
                                 "Optimization Perspective; k-diffusion's sample_gradient_estimation")
def sample_gradient_estimation(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                               callback: Callback = None, ge_gamma: float = 2.0, variable: str = "auto") -> Tensor:
    """Euler on ``dy/dk = (y - D) / k`` with the slope extrapolated from the last two,
    ``gamma d_i + (1 - gamma) d_{i-1}`` (gamma = 2: a momentum-like correction of the denoiser's
    error; gamma = 1 is DDIM). The first step is plain Euler."""
    grid = Grid.build(denoiser.process, ts, x)
    form = resolve_variable(grid, variable)
    cs = [coords(form, a, s) for a, s in zip(grid.alpha, grid.sigma, strict=True)]
    weights = [[] if grid.is_final(i) else
               [cs[i + 1][1] - cs[i][1]] if i == 0 else
               [(cs[i + 1][1] - cs[i][1]) * ge_gamma, (cs[i + 1][1] - cs[i][1]) * (1 - ge_gamma)]
               for i in range(grid.steps)]
    return _adams_bashforth(denoiser, x, grid, cs, weights, 2, callback)


def _transfer(x: Tensor, e: Tensor, ai: float, si: float, aj: float, sj: float) -> Tensor:
    """PNDM's transfer phi(x, eps, i -> j) = alpha_j (x - sigma_i eps) / alpha_i + sigma_j eps."""
    return (aj / ai) * (x - si * e) + sj * e


@register("plms", "Liu et al. 2022, Pseudo Numerical Methods for Diffusion Models (PLMS)")
def sample_plms(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                callback: Callback = None, order: int = 4) -> Tensor:
    """Pseudo linear multistep: Adams-Bashforth on the noise estimate, moved with the DDIM
    transfer; the first steps use lower orders (no extra evaluations)."""
    return _pndm(denoiser, x, ts, callback=callback, order=order, warmup="plms")


@register("pndm", "Liu et al. 2022, Pseudo Numerical Methods for Diffusion Models (PNDM, PRK warm-up)")
def sample_pndm(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                callback: Callback = None) -> Tensor:
    """PNDM: three pseudo Runge-Kutta steps (four evaluations each), then fourth-order PLMS."""
    return _pndm(denoiser, x, ts, callback=callback, order=4, warmup="prk")


def _pndm(denoiser: DenoiseFn, x: Tensor, ts, *, callback: Callback, order: int, warmup: str) -> Tensor:
    _check_order("plms", order, 4)
    grid = Grid.build(denoiser.process, ts, x)
    mids = [grid.point(_mid_lam(grid, i)) if warmup == "prk" and i < 3 else None for i in range(grid.steps)]
    times = grid.times()
    t_mid = grid.times([m[0] if m else 0.0 for m in mids])
    eps_hist: list[Tensor] = []
    for i in range(grid.steps):
        j = i + 1
        ai, si, aj, sj = grid.step(i)
        d = evaluate(denoiser, x, times[i], i, callback)
        if grid.is_final(i):
            x = d
            continue
        e = (x - ai * d) / si
        if ai == 0.0:  # the transfer divides by alpha_i: first-order (DDIM) step from alpha = 0
            eps_hist = [e]
            cx, cd = ddim_coefficients(ai, si, aj, sj)
            x = cx * x + cd * d
            continue
        if mids[i] is not None:
            _, am, sm = mids[i]
            x1 = _transfer(x, e, ai, si, am, sm)
            e2 = _eps_at(denoiser, x1, t_mid[i], am, sm)
            x2 = _transfer(x, e2, ai, si, am, sm)
            e3 = _eps_at(denoiser, x2, t_mid[i], am, sm)
            x3 = _transfer(x, e3, ai, si, aj, sj)
            e4 = _eps_at(denoiser, x3, times[j], aj, sj)
            eps_hist = [e, *eps_hist][:4]
            x = _transfer(x, (e + 2 * e2 + 2 * e3 + e4) / 6, ai, si, aj, sj)
            continue
        eps_hist = [e, *eps_hist][:order]
        coef = ADAMS_BASHFORTH[len(eps_hist)]
        e_comb = sum(c * h for c, h in zip(coef, eps_hist, strict=True))
        x = _transfer(x, e_comb, ai, si, aj, sj)
    return x


def _mid_lam(grid: Grid, i: int) -> float:
    """lambda at the midpoint in t of step i (PNDM's t + delta/2)."""
    if grid.is_final(i):
        return grid.lam[i]
    tm = 0.5 * (grid.t[i] + grid.t[i + 1])
    return float(grid.process.logsnr(torch.tensor(tm, dtype=torch.float64))) / 2


def _eps_at(denoiser: DenoiseFn, x: Tensor, t: Tensor, a: float, s: float) -> Tensor:
    return (x - a * denoiser(x, t)) / s


@register("deis", "Zhang & Chen 2023, Fast Sampling with Exponential Integrator (DEIS, tAB)")
def sample_deis(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                callback: Callback = None, order: int = 3, form: str = "data") -> Tensor:
    """DEIS tAB: the exponential integrator with the network output extrapolated by a polynomial
    in t, its weights integrated by Gauss-Legendre quadrature (exact to float64 here).

    ``form="eps"`` is the paper's: ``d(x / alpha) / ds = eps`` in the noise level s, so
    ``x_j / alpha_j = x_i / alpha_i + sum_k C_k eps_k`` with ``C_k = int L_k(t(s)) ds``; it divides
    by alpha and takes a first-order step from alpha = 0. ``form="data"`` extrapolates D instead:
    ``d(x / sigma) / du = D`` with u = alpha / sigma, ``C_k = int L_k(t(u)) du``. It is finite at
    alpha = 0 (u = 0) and keeps full order from the first steps of a flow or zero-SNR grid.
    """
    _check_order("deis", order, 3)
    if form not in ("data", "eps"):
        raise ValueError(f"deis form must be 'data' or 'eps', got {form!r}")
    grid = Grid.build(denoiser.process, ts, x)
    plan = []
    for i in range(grid.steps):
        if grid.is_final(i) or (form == "eps" and grid.alpha[i] == 0.0):
            plan.append(None)
            continue
        p = min(order, i + 1) if form == "data" else min(order, grid.finite_history(i, order), i + 1)
        plan.append(_tab_weights(grid, i, p, form))
    times = grid.times()
    hist: list[Tensor] = []
    for i in range(grid.steps):
        i + 1
        ai, si, aj, sj = grid.step(i)
        d = evaluate(denoiser, x, times[i], i, callback)
        hist = [d if form == "data" else (x - ai * d) / si, *hist][:order]
        if plan[i] is None:
            cx, cd = ddim_coefficients(ai, si, aj, sj)
            x = cx * x + cd * d
            continue
        if form == "data":
            y = x / si
            for w, h in zip(plan[i], hist, strict=False):
                y = y + w * h
            x = sj * y
        else:
            y = x / ai
            for w, h in zip(plan[i], hist, strict=False):
                y = y + w * h
            x = aj * y
    return x


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)


def _tab_weights(grid: Grid, i: int, p: int, form: str) -> list[float]:
    """C_k = int L_k(t) dv over the step, v = s (eps form) or u = 1 / s (data form), for the
    Lagrange basis on t_i, t_{i-1}, ..."""
    if form == "eps":
        v_i, v_j = grid.sigma[i] / grid.alpha[i], grid.sigma[i + 1] / grid.alpha[i + 1]
    else:
        v_i, v_j = grid.alpha[i] / grid.sigma[i], grid.alpha[i + 1] / grid.sigma[i + 1]
    nodes_t = [grid.t[i - k] for k in range(p)]
    half = 0.5 * (v_j - v_i)
    v = torch.from_numpy(0.5 * (v_i + v_j) + half * _GL_NODES)
    level = v if form == "eps" else 1.0 / v
    t = grid.process.t_from_noise_level(level).numpy()
    out = []
    for k, tk in enumerate(nodes_t):
        basis = np.ones_like(t)
        for m, tm in enumerate(nodes_t):
            if m != k:
                basis *= (t - tm) / (tk - tm)
        out.append(float(half * np.dot(_GL_WEIGHTS, basis)))
    return out
