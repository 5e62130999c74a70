"""Gaussian mixtures with a closed-form denoiser: the ground truth for samplers and guidance.

Data ``x0 ~ sum_k w_k N(mu_k, Sigma_k)``. Under ``x_t = alpha x0 + sigma eps`` the noised marginal
is again a mixture, ``sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)``, so the posterior mean
``E[x0 | x_t]`` (Tweedie), the noise estimate, the score and the log-density are exact. Covariances
are stored by their eigendecomposition ``Sigma_k = Q_k diag(lam_k) Q_k^T`` (full, or low-rank plus
an isotropic floor).

Because the posterior depends on (x_t, alpha, sigma) only through ``x_t / alpha`` and
``sigma / alpha``, the probability-flow ODE is the same for every process up to a change of time:
:meth:`GaussianMixture.ode_solve` integrates it once, exactly enough to serve as the reference
every sampler is measured against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from difflab.denoiser import Denoiser
from difflab.processes import Process

Tensor = torch.Tensor

#: where the reference solver starts when the grid starts at alpha = 0 (logSNR = -inf); the
#: integrand carries a factor exp(logSNR / 2), so what is left out is below 1e-15 of the signal.
LAMBDA_FLOOR = -70.0


class GaussianMixture:
    """A Gaussian mixture in R^d with exact noised posteriors.

    Args:
        weights: (K,) mixture weights (normalised here).
        means: (K, d).
        eigvals: (K, d) covariance eigenvalues, all > 0.
        eigvecs: (K, d, d) orthonormal eigenvectors (columns), or None for the identity basis.
        labels: (K,) integer class of each component, for class-conditional use.
    """

    def __init__(
        self,
        weights: Tensor,
        means: Tensor,
        eigvals: Tensor,
        eigvecs: Tensor | None = None,
        labels: Tensor | None = None,
    ):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        k, d = means.shape
        weights = torch.as_tensor(weights, dtype=torch.float64)
        eigvals = torch.as_tensor(eigvals, dtype=torch.float64)
        if weights.shape != (k,) or bool((weights <= 0).any()):
            raise ValueError(f"weights must be {k} positive numbers, got shape {tuple(weights.shape)}")
        if eigvals.shape != (k, d) or bool((eigvals <= 0).any()):
            raise ValueError(f"eigvals must be positive with shape ({k}, {d}), got {tuple(eigvals.shape)}")
        if eigvecs is None:
            eigvecs = torch.eye(d, dtype=torch.float64).expand(k, d, d).clone()
        eigvecs = torch.as_tensor(eigvecs, dtype=torch.float64)
        if eigvecs.shape != (k, d, d):
            raise ValueError(f"eigvecs must have shape ({k}, {d}, {d}), got {tuple(eigvecs.shape)}")
        self.log_weights = (weights / weights.sum()).log()
        self.means, self.eigvals, self.eigvecs = means, eigvals, eigvecs
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.labels is not None and self.labels.shape != (k,):
            raise ValueError(f"labels must have one class per component ({k}), got {tuple(self.labels.shape)}")
        self.num_components, self.dim = k, d

    # constructors ----------------------------------------------------------------------------
    @classmethod
    def ring(cls, num_components: int = 8, radius: float = 1.0, std: float = 0.05,
             num_classes: int | None = None) -> GaussianMixture:
        """2-D ring of isotropic Gaussians; ``num_classes`` groups neighbouring components."""
        ang = torch.arange(num_components, dtype=torch.float64) * (2 * math.pi / num_components)
        means = radius * torch.stack([ang.cos(), ang.sin()], 1)
        labels = None
        if num_classes:
            labels = torch.arange(num_components) * num_classes // num_components
        return cls(torch.ones(num_components), means, torch.full((num_components, 2), std**2), labels=labels)

    @classmethod
    def low_rank(cls, dim: int = 64, num_components: int = 8, rank: int = 4, *, floor: float = 1e-2,
                 mean_std: float = 0.5, spread_std: float = 0.5, num_classes: int | None = None,
                 seed: int = 0) -> GaussianMixture:
        """Random d-dimensional mixture, each covariance ``U U^T + floor I`` with U of rank ``rank``:
        data near a union of low-dimensional affine subspaces, like images. Per dimension the means
        have std ``mean_std`` and the low-rank part std ``spread_std`` (so ``U U^T`` has ``rank``
        eigenvalues near ``dim * spread_std^2 / rank``)."""
        g = torch.Generator().manual_seed(seed)
        means = mean_std * torch.randn(num_components, dim, generator=g, dtype=torch.float64)
        eigvecs, eigvals = [], []
        for _ in range(num_components):
            u = spread_std / math.sqrt(rank) * torch.randn(dim, rank, generator=g, dtype=torch.float64)
            lam, q = torch.linalg.eigh(u @ u.T + floor * torch.eye(dim, dtype=torch.float64))
            eigvecs.append(q)
            eigvals.append(lam.clamp_min(floor))
        w = torch.rand(num_components, generator=g, dtype=torch.float64) + 0.5
        labels = None
        if num_classes:
            labels = torch.arange(num_components) * num_classes // num_components
        return cls(w, means, torch.stack(eigvals), torch.stack(eigvecs), labels=labels)

    @classmethod
    def gaussian(cls, mean: Tensor, eigvals: Tensor, eigvecs: Tensor | None = None) -> GaussianMixture:
        """A single Gaussian (its ODE has a closed-form solution)."""
        mean = torch.as_tensor(mean, dtype=torch.float64)
        ev = None if eigvecs is None else torch.as_tensor(eigvecs)[None]
        return cls(torch.ones(1), mean[None], torch.as_tensor(eigvals)[None], ev)

    # core math ---------------------------------------------------------------------------------
    def _component_mask(self, labels: Tensor | None, batch: int, device) -> Tensor | None:
        if labels is None:
            return None
        if self.labels is None:
            raise ValueError("this mixture has no class labels; build it with num_classes=...")
        labels = torch.as_tensor(labels, device=device).long().reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch)
        if labels.shape != (batch,):
            raise ValueError(f"labels must be one per sample ({batch}), got {tuple(labels.shape)}")
        # -1 is the null class (as for networks): that sample is unconditional
        return (self.labels.to(device)[None, :] == labels[:, None]) | (labels[:, None] < 0)  # (B, K)

    def _posterior(self, xbar: Tensor, s: Tensor, labels: Tensor | None):
        """Responsibilities (B, K) and per-component posterior means (B, K, d) in VE form.

        ``xbar = x_t / alpha`` (B, d) and noise level ``s = sigma / alpha`` (B, 1), float64.
        """
        dev = xbar.device
        q, lam, mu = self.eigvecs.to(dev), self.eigvals.to(dev), self.means.to(dev)
        var = lam[None] + (s * s)[:, :, None]  # (B, K, d) noised variances per eigen-direction
        z = torch.einsum("kde,bkd->bke", q, xbar[:, None, :] - mu[None])  # coordinates in eigenbasis
        logp = -0.5 * ((z * z) / var + var.log()).sum(-1) + self.log_weights.to(dev)[None]
        mask = self._component_mask(labels, xbar.shape[0], dev)
        if mask is not None:
            logp = logp.masked_fill(~mask, -math.inf)
        resp = torch.softmax(logp, dim=-1)
        shrink = lam[None] / var  # posterior mean = mu + Q diag(lam / (lam + s^2)) z
        post = mu[None] + torch.einsum("kde,bke->bkd", q, shrink * z)
        return resp, post, logp

    def denoise_ve(self, xbar: Tensor, s: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """E[x0 | x0 + s eps = xbar]."""
        dtype = xbar.dtype
        xb = xbar.double().reshape(xbar.shape[0], -1)
        s = torch.as_tensor(s, dtype=torch.float64, device=xbar.device).reshape(-1, 1).expand(xb.shape[0], 1)
        resp, post, _ = self._posterior(xb, s, labels)
        return torch.einsum("bk,bkd->bd", resp, post).to(dtype).reshape(xbar.shape)

    def denoise(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float,
                labels: Tensor | None = None) -> Tensor:
        """Exact ``E[x0 | x_t = x]`` for ``x_t = alpha x0 + sigma eps``; finite at alpha = 0."""
        b = x.shape[0]
        a = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(b, 1)
        sg = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(b, 1)
        xd = x.double().reshape(b, -1)
        # x / alpha and sigma / alpha, written so that alpha = 0 gives the prior mean
        safe_a = torch.where(a > 0, a, torch.ones_like(a))
        xbar = torch.where(a > 0, xd / safe_a, torch.zeros_like(xd))
        s = torch.where(a > 0, sg / safe_a, torch.full_like(sg, math.inf))
        resp, post, _ = self._posterior(xbar, torch.where(torch.isinf(s), torch.ones_like(s), s), labels)
        prior_mean = self._prior_mean(labels, b, x.device)
        out = torch.einsum("bk,bkd->bd", resp, post)
        out = torch.where(torch.isinf(s), prior_mean, out)
        return out.to(x.dtype).reshape(x.shape)

    def _prior_mean(self, labels: Tensor | None, batch: int, device) -> Tensor:
        w = self.log_weights.to(device)[None].expand(batch, -1)
        mask = self._component_mask(labels, batch, device)
        if mask is not None:
            w = w.masked_fill(~mask, -math.inf)
        return torch.softmax(w, -1) @ self.means.to(device)

    def eps(self, x: Tensor, alpha, sigma, labels=None) -> Tensor:
        """Exact ``E[eps | x_t]`` (needs sigma > 0)."""
        a = _col(alpha, x)
        s = _col(sigma, x)
        return (x - a * self.denoise(x, alpha, sigma, labels)) / s

    def log_density(self, x: Tensor, alpha, sigma, labels=None) -> Tensor:
        """log p_t(x_t) of the noised marginal (needs alpha > 0), differentiable in x."""
        b = x.shape[0]
        a = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(b, 1)
        sg = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(b, 1)
        xd = x.double().reshape(b, -1)
        _, _, logp = self._posterior(xd / a, sg / a, labels)
        if labels is not None:
            mask = self._component_mask(labels, b, x.device)
            norm = torch.logsumexp(self.log_weights.to(x.device)[None].masked_fill(~mask, -math.inf), -1)
            logp = logp - norm[:, None]
        # change of variables x = alpha * xbar, plus the Gaussian constant
        const = -0.5 * self.dim * math.log(2 * math.pi) - self.dim * a.log().squeeze(-1)
        return (torch.logsumexp(logp, -1) + const).to(x.dtype)

    def score(self, x: Tensor, alpha, sigma, labels=None) -> Tensor:
        """Exact score ``grad log p_t(x) = (alpha E[x0|x] - x) / sigma^2``."""
        return (_col(alpha, x) * self.denoise(x, alpha, sigma, labels) - x) / _col(sigma, x) ** 2

    def sample(self, n: int, *, generator: torch.Generator | None = None, labels: Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """Exact samples of x0 (of the given classes, if ``labels``)."""
        logw = self.log_weights[None].expand(n, -1)
        mask = self._component_mask(labels, n, "cpu")
        if mask is not None:
            logw = logw.masked_fill(~mask, -math.inf)
        comp = torch.multinomial(torch.softmax(logw, -1), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + torch.einsum("bde,be->bd", self.eigvecs[comp], self.eigvals[comp].sqrt() * z)
        return x.to(dtype)

    # process-bound helpers ---------------------------------------------------------------------
    def denoiser(self, process: Process, prediction: str = "x0") -> Denoiser:
        """An exact :class:`~difflab.Denoiser` for ``process``, given in any prediction's terms.

        ``class_labels=`` passed as conditioning restricts the posterior to those classes (-1: none,
        the unconditional denoiser), as a class-conditional network's ``class_labels`` do.
        """
        from difflab import predictions

        pred = predictions.get(prediction)

        def net(x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
            tt = t.to(torch.float64)
            a = _col(process.alpha(tt), x).to(torch.float64)
            s = _col(process.sigma(tt), x).to(torch.float64)
            xd = x.double()
            # undo the prediction's input scaling so the exact posterior sees x_t itself
            scale = pred.input_scale(a, s)
            xd = xd / scale
            x0 = self.denoise(xd, a.flatten(), s.flatten(), class_labels)
            return pred.from_x0(x0, xd, a, s).to(x.dtype)

        return Denoiser.from_fn(net, process, pred, time="t")

    def ode_solve(self, x: Tensor, process: Process, t_start: float, t_end: float | None = None, *,
                  labels: Tensor | None = None, rtol: float = 1e-10, atol: float = 1e-12) -> Tensor:
        """Reference solution of the probability-flow ODE from ``t_start`` to ``t_end``.

        Integrates ``d(x / sigma) / d lambda = exp(lambda) E[x0 | x]`` (lambda = log(alpha / sigma),
        the exact data-prediction form of Lu et al. 2022, DPM-Solver++) with scipy's DOP853.
        ``t_end = None`` means the sampler convention: integrate to ``process.t_min`` and apply the
        exact denoiser there, which is where every difflab grid ends. ``t_end = 0`` integrates all the
        way to clean data (lambda = +inf) in the log-noise-level variable instead.
        """
        from scipy.integrate import solve_ivp

        final_denoise = t_end is None
        t_stop = process.t_min if final_denoise else float(t_end)
        lam0 = float(process.logsnr(torch.tensor(float(t_start), dtype=torch.float64))) / 2
        lam1 = math.inf if t_stop == 0 else float(process.logsnr(torch.tensor(t_stop, dtype=torch.float64))) / 2
        lam0 = max(lam0, LAMBDA_FLOOR)
        shape, b = x.shape, x.shape[0]
        # y = x / sigma is the same for every (alpha, sigma) with the same ratio, so the state is
        # carried in the process's own scale and integrated with a VP-normalised pair
        s_start = float(process.sigma(torch.tensor(float(t_start), dtype=torch.float64)))
        y0 = (x.double().reshape(b, -1) / s_start).flatten().numpy()

        def rhs(lam: float, y: np.ndarray) -> np.ndarray:
            a, s = _alpha_sigma_of_lambda(lam)
            xt = torch.from_numpy(y).reshape(b, -1) * s
            d0 = self.denoise(xt, a, s, labels)
            return (math.exp(lam) * d0).flatten().numpy()

        if math.isinf(lam1):
            # past a finite point, continue in u = -log(noise level) is lambda itself: switch to
            # the VE form d xbar / d log s = xbar - D(xbar, s) down to s = 0 via s = exp(-lambda)
            lam_mid = max(lam0, 12.0)
            y = y0
            if lam_mid > lam0:
                y = solve_ivp(rhs, (lam0, lam_mid), y0, method="DOP853", rtol=rtol, atol=atol).y[:, -1]
            a, s = _alpha_sigma_of_lambda(lam_mid)
            xbar = torch.from_numpy(y).reshape(b, -1) * s / a  # x / alpha, the same in any scale

            def rhs_s(sv: float, xb: np.ndarray) -> np.ndarray:
                xbt = torch.from_numpy(xb).reshape(b, -1)
                if sv <= 0:
                    return np.zeros_like(xb)
                return ((xbt - self.denoise_ve(xbt, sv, labels)) / sv).flatten().numpy()

            sol = solve_ivp(rhs_s, (math.exp(-lam_mid), 0.0), xbar.flatten().numpy(), method="DOP853",
                            rtol=rtol, atol=atol)
            return torch.from_numpy(sol.y[:, -1]).reshape(shape).to(x.dtype)

        sol = solve_ivp(rhs, (lam0, lam1), y0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solver failed: {sol.message}")
        t1 = torch.tensor(t_stop, dtype=torch.float64)
        a1, s1 = float(process.alpha(t1)), float(process.sigma(t1))
        x1 = torch.from_numpy(sol.y[:, -1]).reshape(b, -1) * s1
        if final_denoise:
            x1 = self.denoise(x1, a1, s1, labels)
        return x1.reshape(shape).to(x.dtype)

    def gaussian_ode_closed_form(self, x: Tensor, process: Process, t_start: float, t_end: float) -> Tensor:
        """Closed-form probability-flow ODE solution for a single-Gaussian "mixture".

        In VE form each eigen-coordinate follows ``z(s) = z(s0) sqrt(lam + s^2) / sqrt(lam + s0^2)``.
        """
        if self.num_components != 1:
            raise ValueError("the closed form exists for a single Gaussian only")
        t0 = torch.tensor(float(t_start), dtype=torch.float64)
        t1 = torch.tensor(float(t_end), dtype=torch.float64)
        a0, s0 = process.alpha(t0), process.sigma(t0)
        a1, s1 = process.alpha(t1), process.sigma(t1)
        q, lam, mu = self.eigvecs[0], self.eigvals[0], self.means[0]
        b = x.shape[0]
        # generic in (alpha, sigma): x = alpha mu + Q diag(sqrt(alpha^2 lam + sigma^2)) w is the flow
        w = (x.double().reshape(b, -1) - a0 * mu) @ q / (a0**2 * lam + s0**2).sqrt()
        out = a1 * mu + (w * (a1**2 * lam + s1**2).sqrt()) @ q.T
        return out.reshape(x.shape).to(x.dtype)


def _alpha_sigma_of_lambda(lam: float) -> tuple[float, float]:
    """A (alpha, sigma) pair with log(alpha / sigma) = lam; VP-normalised (any pair would do,
    since the posterior depends on the ratio only and x / sigma is the integrated state)."""
    a = math.sqrt(1 / (1 + math.exp(-2 * lam))) if lam > -350 else 0.0
    s = math.sqrt(1 / (1 + math.exp(2 * lam))) if lam < 350 else 0.0
    return a, s


def _col(v, x: Tensor) -> Tensor:
    v = torch.as_tensor(v, device=x.device, dtype=v.dtype if isinstance(v, Tensor) else x.dtype)
    if v.ndim == 0:
        return v.to(x.dtype)
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def sliced_wasserstein(a: Tensor, b: Tensor, *, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point sets (Bonneel et al. 2015)."""
    if a.shape != b.shape:
        raise ValueError(f"point sets must have equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a.double().reshape(a.shape[0], -1)
    b = b.double().reshape(b.shape[0], -1)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, _ = (a @ dirs).sort(0)
    pb, _ = (b @ dirs).sort(0)
    return float(((pa - pb) ** 2).mean().sqrt())


__all__: Sequence[str] = ["GaussianMixture", "sliced_wasserstein"]
