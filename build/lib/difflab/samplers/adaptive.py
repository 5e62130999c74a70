"""Adaptive step size with error control: DPM-Solver-12 in data-prediction form."""

from __future__ import annotations

import math

import torch

from difflab.samplers.base import Callback, DenoiseFn, Generator, Grid, ddim_coefficients, emit, register

Tensor = torch.Tensor

#: where a run that starts at alpha = 0 begins stepping in lambda; y = x / sigma moves by at most
#: exp(LAMBDA_START) * max|D| on (-inf, LAMBDA_START], below float32 resolution
LAMBDA_START = -20.0


@register("adaptive", "Lu et al. 2022, DPM-Solver (Sec. 4.2, adaptive step size, DPM-Solver-12)")
def sample_adaptive(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                    callback: Callback = None, rtol: float = 0.05, atol: float = 0.0078,
                    theta: float = 0.9, h_init: float = 0.5, max_evals: int = 1000) -> Tensor:
    """Embedded first/second-order pair in lambda: DDIM and DPM-Solver++(2S) share the first
    evaluation; the step is accepted when the RMS difference, scaled by
    ``atol + rtol * max(|x_low|, |x_prev|)``, is at most 1 for every sample; the next step is
    ``theta * h * E^(-1/2)``. Only the grid's first and last non-zero points are used. The step
    size is controlled on the host, so this sampler synchronises once per step by design.
    Count its evaluations with ``difflab.sample(..., return_nfe=True)``.
    """
    grid = Grid.build(denoiser.process, ts, x)
    lam = max(grid.lam[0], LAMBDA_START)
    lam_end = grid.lam[-2]
    if not math.isfinite(lam_end):
        raise ValueError("the adaptive sampler needs a grid whose last non-zero point has sigma > 0")
    a, s = grid.alpha[0], grid.sigma[0]
    h = min(h_init, lam_end - lam)
    evals, step = 0, 0
    t_i = torch.tensor(grid.t[0], device=x.device, dtype=x.dtype)
    d = denoiser(x, t_i)
    emit(callback, step, t_i, x, d)
    while lam < lam_end - 1e-12:
        if evals + 3 > max_evals:
            raise RuntimeError(f"adaptive sampler hit max_evals={max_evals} before the end; raise rtol/atol")
        lam_next = min(lam + h, lam_end)
        t_mid, a_mid, s_mid = grid.point(0.5 * (lam + lam_next))
        t_next, a_next, s_next = grid.point(lam_next)
        cmx, cmd = ddim_coefficients(a, s, a_mid, s_mid)
        d_mid = denoiser(cmx * x + cmd * d, torch.tensor(t_mid, device=x.device, dtype=x.dtype))
        evals += 1
        cx, cd = ddim_coefficients(a, s, a_next, s_next)
        x_low = cx * x + cd * d
        x_high = cx * x + cd * d_mid
        scale = atol + rtol * torch.maximum(x_low.abs(), x.abs())
        err = ((x_high - x_low) / scale).flatten(1).pow(2).mean(1).sqrt().max()
        err_value = max(float(err), 1e-10)
        if err_value <= 1.0:
            x, lam, a, s = x_high, lam_next, a_next, s_next
            step += 1
            t_i = torch.tensor(t_next if lam < lam_end else grid.t[-2], device=x.device, dtype=x.dtype)
            d = denoiser(x, t_i)
            evals += 1
            emit(callback, step, t_i, x, d)
        h = min(theta * h * err_value ** -0.5, 2.0 * h if err_value <= 1.0 else h)
    return d  # the evaluation at the last non-zero point is the final denoise

