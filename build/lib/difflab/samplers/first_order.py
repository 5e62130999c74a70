"""First-order samplers: DDIM (with eta), DDPM ancestral sampling, Euler with churn."""

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
    emit,
    noise_like,
    register,
)

Tensor = torch.Tensor


@register("ddim", "Song et al. 2021, Denoising Diffusion Implicit Models", stochastic=True)
def sample_ddim(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                callback: Callback = None, eta: float = 0.0) -> Tensor:
    """DDIM: ``x_j = alpha_j D + sqrt(sigma_j^2 - c^2) eps_hat + c z``, c = eta x (DDPM noise).

    eta = 0 is the deterministic probability-flow step (= Euler in the noise level); eta = 1 is
    ancestral sampling in distribution. The step onto t = 0 returns D.
    """
    grid = Grid.build(denoiser.process, ts, x)
    times = grid.times()
    for i in range(grid.steps):
        j = i + 1
        d = denoiser(x, times[i])
        emit(callback, i, times[i], x, d)
        sigma_down, noise = ancestral_split(grid.alpha[i], grid.sigma[i], grid.alpha[j], grid.sigma[j], eta)
        cx, cd = ddim_coefficients(grid.alpha[i], grid.sigma[i], grid.alpha[j], sigma_down)
        x = cx * x + cd * d
        if noise > 0:
            x = x + noise * noise_like(x, generator)
    return x


@register("euler_ancestral", "Crowson 2022, k-diffusion (Euler ancestral); Ho et al. 2020", stochastic=True)
def sample_euler_ancestral(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                           callback: Callback = None, eta: float = 1.0) -> Tensor:
    """Euler step to sigma_down, then fresh noise: written in (alpha, sigma) it is exactly DDIM with
    the same eta, so it runs that update; kept under k-diffusion's name with its default eta = 1."""
    return sample_ddim(denoiser, x, ts, generator=generator, callback=callback, eta=eta)


@register("ddpm", "Ho et al. 2020, Denoising Diffusion Probabilistic Models (Eq. 7)", stochastic=True)
def sample_ddpm(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                callback: Callback = None, variance: str = "posterior") -> Tensor:
    """Ancestral sampling from the DDPM posterior q(x_j | x_i, x0 = D), for any pair of grid points.

    Posterior (Kingma et al. 2021, any process): with alpha_ij = alpha_i / alpha_j and
    beta_ij = sigma_i^2 - alpha_ij^2 sigma_j^2, mean = (alpha_j beta_ij / sigma_i^2) D
    + (alpha_ij sigma_j^2 / sigma_i^2) x_i and variance beta_ij sigma_j^2 / sigma_i^2 ("posterior",
    Ho et al.'s beta-tilde) or beta_ij ("large", Ho et al.'s beta, capped at sigma_j^2).
    """
    if variance not in ("posterior", "large"):
        raise ValueError(f"variance must be 'posterior' or 'large', got {variance!r}")
    grid = Grid.build(denoiser.process, ts, x)
    times = grid.times()
    for i in range(grid.steps):
        j = i + 1
        ai, si, aj, sj = grid.alpha[i], grid.sigma[i], grid.alpha[j], grid.sigma[j]
        d = denoiser(x, times[i])
        emit(callback, i, times[i], x, d)
        a_ij = ai / aj
        beta = si * si - a_ij * a_ij * sj * sj
        x = (aj * beta / (si * si)) * d + (a_ij * sj * sj / (si * si)) * x
        var = beta * sj * sj / (si * si) if variance == "posterior" else min(beta, sj * sj)
        if var > 0:
            x = x + math.sqrt(var) * noise_like(x, generator)
    return x


@register("euler", "Karras et al. 2022, Elucidating the Design Space (Algorithm 2, Euler, with churn)",
          stochastic=True)
def sample_euler(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                 callback: Callback = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0) -> Tensor:
    """Euler steps in the noise level with EDM's stochastic churn.

    With ``s_churn = 0`` it is deterministic and equal to DDIM (eta = 0). Churn raises the noise
    level by gamma = min(s_churn / steps, sqrt(2) - 1) on levels within [s_tmin, s_tmax].
    """
    grid = Grid.build(denoiser.process, ts, x)
    hats = _churn_points(grid, s_churn, s_tmin, s_tmax)
    times = grid.times([h[0] for h in hats])
    for i in range(grid.steps):
        j = i + 1
        _, a_hat, s_hat, extra = hats[i]
        x = _churn(x, grid.alpha[i], a_hat, extra, s_noise, generator)
        d = denoiser(x, times[i])
        emit(callback, i, times[i], x, d)
        cx, cd = ddim_coefficients(a_hat, s_hat, grid.alpha[j], grid.sigma[j])
        x = cx * x + cd * d
    return x


def _churn_points(grid: Grid, s_churn: float, s_tmin: float, s_tmax: float
                  ) -> list[tuple[float, float, float, float]]:
    """Per step (t_hat, alpha_hat, sigma_hat, std of the noise added in VE form)."""
    gamma0 = min(s_churn / grid.steps, math.sqrt(2) - 1) if s_churn > 0 else 0.0
    out = []
    for i in range(grid.steps):
        a, s = grid.alpha[i], grid.sigma[i]
        level = s / a if a > 0 else math.inf
        if gamma0 > 0 and math.isfinite(level) and s_tmin <= level <= s_tmax and grid.sigma[i + 1] > 0:
            level_hat = level * (1 + gamma0)
            t_hat, a_hat, s_hat = grid.point_at_level(level_hat)
            if t_hat <= grid.process.t_max:
                out.append((t_hat, a_hat, s_hat, math.sqrt(level_hat**2 - level**2)))
                continue
        out.append((grid.t[i], a, s, 0.0))
    return out


def _churn(x: Tensor, alpha: float, alpha_hat: float, extra: float, s_noise: float,
           generator: Generator) -> Tensor:
    """Add noise to move x from its level to the raised level (in x-space: rescale alpha too)."""
    if extra == 0.0:
        return x
    return (alpha_hat / alpha) * x + (alpha_hat * extra * s_noise) * noise_like(x, generator)
