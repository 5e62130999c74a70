"""UniPC: unified predictor-corrector in data prediction (Zhao et al. 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from difflab.samplers.base import Callback, DenoiseFn, Generator, Grid, evaluate, register

Tensor = torch.Tensor


def _unipc_coefficients(lams: list[float], lam_j: float, variant: str, corrector: bool
                        ) -> tuple[float, list[float], float]:
    """Coefficients of UniP-p (or UniC-p) for one step.

    ``lams`` = [lambda_i, lambda_{i-1}, ...] (p points, p = order). Returns (weight on D_i,
    weights on the older D, weight on D_j) in units of alpha_j, so that
    ``x_j = (sigma_j / sigma_i) x_i + alpha_j (w0 D_i + sum_k w_k D_{i-k} + w_new D_j)``.
    Follows Algorithm 2 of the paper with B(h) = h (bh1) or e^h - 1 (bh2).
    """
    order = len(lams)
    lam_i = lams[0]
    h = lam_j - lam_i
    rks = [(lk - lam_i) / h for lk in lams[1:]] + [1.0]
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    big_r, bvec = np.array(rows), np.array(b)
    if corrector:
        rhos = [0.5] if order == 1 else list(np.linalg.solve(big_r, bvec))
    elif order == 1:
        rhos = []
    elif order == 2:
        rhos = [0.5]
    else:
        rhos = list(np.linalg.solve(big_r[:-1, :-1], bvec[:-1]))
    w0 = -h_phi_1
    older = []
    for rho, rk in zip(rhos[: order - 1], rks[:-1], strict=False):
        older.append(-b_h * rho / rk)  # D1_k = (D_{i-k} - D_i) / r_k
        w0 += b_h * rho / rk
    w_new = 0.0
    if corrector:
        w_new = -b_h * rhos[-1]  # D1_t = D_j - D_i
        w0 += b_h * rhos[-1]
    return w0, older, w_new


def compensation_weights(t: tuple[float, ...], i: int, ratio: float, dc_order: int) -> list[float] | None:
    """DC-Solver's dynamic compensation (Zhao et al. 2024, Eq. 12): the newest model output D_i is
    replaced by the Lagrange interpolant of D_i, ..., D_{i-dc_order} (nodes t_i, ..., t_{i-dc_order})
    evaluated at ``t' = ratio t_i + (1 - ratio) t_{i-1}``. Returns the weights on those outputs,
    newest first (they sum to 1), or None where there is nothing to do (ratio 1, or warm-up)."""
    if ratio == 1.0 or i < dc_order:
        return None
    nodes = [t[i - k] for k in range(dc_order + 1)]
    target = ratio * t[i] + (1.0 - ratio) * t[i - 1]
    weights = []
    for k, tk in enumerate(nodes):
        w = 1.0
        for m, tm in enumerate(nodes):
            if m != k:
                w *= (target - tm) / (tk - tm)
        weights.append(w)
    return weights


def _check_dc(dc_ratios: Sequence[float] | None, dc_order: int, steps: int) -> list[float]:
    if dc_order < 1:
        raise ValueError(f"dc_order must be >= 1, got {dc_order}")
    if dc_ratios is None:
        return [1.0] * steps
    ratios = [float(r) for r in dc_ratios]
    if len(ratios) != steps or not all(math.isfinite(r) for r in ratios):
        raise ValueError(f"dc_ratios needs one finite ratio per step ({steps}), got {len(ratios)}: {ratios[:8]}; "
                         "calibrate them with difflab.samplers.calibration.tune for this step count")
    return ratios


@register("unipc", "Zhao et al. 2023, UniPC: A Unified Predictor-Corrector Framework; "
                   "Zhao et al. 2024, DC-Solver (dynamic compensation, dc_ratios)")
def sample_unipc(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                 callback: Callback = None, order: int = 2, variant: str = "bh2",
                 corrector: bool = True, lower_order_final: bool = True,
                 dc_ratios: Sequence[float] | None = None, dc_order: int = 2) -> Tensor:
    """UniPC with UniP-p predictor and UniC corrector (no extra evaluations: the corrector reuses
    the next step's evaluation). Orders 1-3, warm-up from order 1; ``lower_order_final`` lowers the
    order near the end as in the paper's few-step setting.

    ``dc_ratios`` (one per step, 1 = none) turn it into DC-Solver: before step i the newest output is
    compensated (:func:`compensation_weights`) and kept so in the history; on the final step the
    compensated output is the sample. Ratios are calibrated per model and step count
    (:func:`difflab.samplers.calibration.tune`)."""
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
    grid = Grid.build(denoiser.process, ts, x)
    n = grid.steps
    ratios = _check_dc(dc_ratios, dc_order, n)
    compensation = [compensation_weights(grid.t, i, ratios[i], dc_order) for i in range(n)]
    plan: list[tuple[int, tuple, tuple | None]] = []
    for i in range(n):
        if grid.is_final(i):
            plan.append((1, (), None))
            continue
        p = min(order, grid.finite_history(i, order), i + 1)
        if lower_order_final:
            p = min(p, n - i)
        lams = [grid.lam[i - k] for k in range(p)]
        if not math.isfinite(grid.lam[i]):
            pred, corr = (1.0, [], 0.0), None  # first-order step from alpha = 0, uncorrected
        else:
            pred = _unipc_coefficients(lams, grid.lam[i + 1], variant, corrector=False)
            corr = _unipc_coefficients(lams, grid.lam[i + 1], variant, corrector=True) if corrector else None
        plan.append((p, pred, corr))
    times = grid.times()
    history: list[Tensor] = []
    x_prev: Tensor | None = None
    for i in range(n):
        d = evaluate(denoiser, x, times[i], i, callback)
        if i > 0 and plan[i - 1][2] is not None and x_prev is not None:
            # UniC: redo the previous step with this evaluation (kept as history as it is)
            x = _combine(grid, i - 1, x_prev, history, plan[i - 1][2], d)
        history = [d, *history][:max(order, dc_order + 1)]
        if compensation[i] is not None and len(history) > dc_order:
            history[0] = sum(w * h for w, h in zip(compensation[i], history, strict=False))
        if grid.is_final(i):
            x = history[0]
            continue
        x_prev = x
        x = _combine(grid, i, x, history, plan[i][1], None)
    return x


def _combine(grid: Grid, i: int, x: Tensor, history: list[Tensor], coeffs: tuple, d_new: Tensor | None
             ) -> Tensor:
    w0, older, w_new = coeffs
    aj = grid.alpha[i + 1]
    out = (grid.sigma[i + 1] / grid.sigma[i]) * x + (aj * w0) * history[0]
    for k, w in enumerate(older, start=1):
        out = out + (aj * w) * history[k]
    if d_new is not None and w_new != 0.0:
        out = out + (aj * w_new) * d_new
    return out
