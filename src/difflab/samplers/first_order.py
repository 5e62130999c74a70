"""First-order samplers: DDIM (with eta), DDPM ancestral sampling, Euler with churn, and the
multistep consistency sampler."""

from __future__ import annotations

import math

import torch

from difflab.samplers.base import (
    Callback,
    DenoiseFn,
    Generator,
    Grid,
    ancestral_split,
    churn_points,
    churned_denoise,
    ddim_coefficients,
    evaluate,
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
        d = evaluate(denoiser, x, times[i], i, callback)
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
        i + 1
        ai, si, aj, sj = grid.step(i)
        d = evaluate(denoiser, x, times[i], i, callback)
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
    hats = churn_points(grid, s_churn, s_tmin, s_tmax)
    times = grid.times([h[0] for h in hats])
    for i in range(grid.steps):
        j = i + 1
        _, a_hat, s_hat, _ = hats[i]
        x, d = churned_denoise(denoiser, x, i, grid, hats, times, s_noise, generator, callback)
        cx, cd = ddim_coefficients(a_hat, s_hat, grid.alpha[j], grid.sigma[j])
        x = cx * x + cd * d
    return x



@register("consistency", "Song et al. 2023, Consistency Models (Algorithm 1, multistep sampling)", stochastic=True)
def sample_consistency(denoiser: DenoiseFn, x: Tensor, ts, *, generator: Generator = None,
                       callback: Callback = None) -> Tensor:
    """Jump to clean data with one evaluation, then noise that estimate afresh to the next point:
    ``x_j = alpha_j D(x_i, t_i) + sigma_j z``. One step is the consistency model's one-step map;
    more steps trade evaluations for quality. For a diffusion model (not a consistency student) this
    is ancestral sampling that forgets the state, and needs many steps."""
    grid = Grid.build(denoiser.process, ts, x)
    times = grid.times()
    for i in range(grid.steps):
        d = evaluate(denoiser, x, times[i], i, callback)
        j = i + 1
        x = grid.alpha[j] * d
        if grid.sigma[j] > 0:
            x = x + grid.sigma[j] * noise_like(d, generator)
    return x
