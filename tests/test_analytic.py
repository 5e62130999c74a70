import math

import pytest
import torch

from difflab import processes
from difflab.analytic import GaussianMixture
from difflab.metrics.distances import sliced_wasserstein


@pytest.fixture
def mix():
    return GaussianMixture.low_rank(dim=6, num_components=3, rank=2, floor=0.05, num_classes=3, seed=1)


def test_tweedie_matches_autograd_score(mix):
    """E[x0 | x] = (x + sigma^2 grad log p(x)) / alpha (Tweedie), with grad from autograd."""
    x = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    for alpha, sigma in [(0.9, 0.4), (0.3, 0.95), (1.0, 2.0)]:
        logp = mix.log_density(x, alpha, sigma).sum()
        (grad,) = torch.autograd.grad(logp, x)
        tweedie = (x + sigma**2 * grad) / alpha
        torch.testing.assert_close(mix.denoise(x.detach(), alpha, sigma), tweedie.detach())
        torch.testing.assert_close(mix.score(x.detach(), alpha, sigma), grad)


def test_log_density_integrates_to_one_in_2d():
    ring = GaussianMixture.ring(num_components=4, std=0.3)
    grid = torch.linspace(-4, 4, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    dens = ring.log_density(pts, 0.8, 0.5).exp()
    assert abs(float(dens.sum()) * float(grid[1] - grid[0]) ** 2 - 1) < 1e-3


def test_denoiser_matches_monte_carlo_posterior_mean(mix):
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(400_000, generator=g, dtype=torch.float64)
    alpha, sigma = 0.8, 0.6
    x = mix.sample(3, generator=g, dtype=torch.float64) * alpha + sigma * torch.randn(3, 6, generator=g,
                                                                                      dtype=torch.float64)
    for i in range(3):
        logw = -((x[i] - alpha * x0) ** 2).sum(1) / (2 * sigma**2)
        w = torch.softmax(logw, 0)
        mc = (w[:, None] * x0).sum(0)
        ess = 1 / float((w**2).sum())
        assert ess > 200
        torch.testing.assert_close(mix.denoise(x[i : i + 1], alpha, sigma)[0], mc, atol=8 / math.sqrt(ess), rtol=0)


def test_alpha_zero_gives_prior_mean_and_labels_restrict(mix):
    x = torch.randn(4, 6, dtype=torch.float64)
    prior = (mix.log_weights.exp()[:, None] * mix.means).sum(0)
    torch.testing.assert_close(mix.denoise(x, 0.0, 1.0), prior.expand(4, 6))
    for c in range(3):
        torch.testing.assert_close(mix.denoise(x, 0.0, 1.0, labels=torch.tensor(c)),
                                   mix.means[c].expand(4, 6))
    s = mix.sample(5000, labels=torch.full((5000,), 2), generator=torch.Generator().manual_seed(0),
                   dtype=torch.float64)
    torch.testing.assert_close(s.mean(0), mix.means[2], atol=0.05, rtol=0)


def test_exact_samples_have_the_mixture_moments(mix):
    s = mix.sample(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = mix.log_weights.exp()
    mean = (w[:, None] * mix.means).sum(0)
    covs = torch.einsum("kde,ke,kfe->kdf", mix.eigvecs, mix.eigvals, mix.eigvecs)
    second = (w[:, None, None] * (covs + mix.means[:, :, None] * mix.means[:, None, :])).sum(0)
    torch.testing.assert_close(s.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(s.T @ s / s.shape[0], second, atol=0.02, rtol=0)


@pytest.mark.parametrize("proc", [processes.DiscreteVP.scaled_linear(), processes.Flow(shift=2.0),
                                  processes.EDM(), processes.ContinuousVP.cosine()], ids=str)
def test_reference_ode_solver_matches_closed_form(proc):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    g1 = GaussianMixture.gaussian(torch.tensor([0.5, -1.0, 0.2]), torch.tensor([0.04, 1.0, 2.5]), q)
    t0 = 1.0 if proc.name != "flow" else 0.97
    x = torch.randn(5, 3, dtype=torch.float64) * float(proc.sigma(t0))
    for t1 in (0.3, proc.t_min, 0.0):
        ref = g1.ode_solve(x, proc, t0, t1)
        exact = g1.gaussian_ode_closed_form(x, proc, t0, t1)
        assert float((ref - exact).abs().max()) < 1e-8
    # from alpha = 0 (rectified flow at t = 1) too
    flow = processes.Flow()
    x = torch.randn(5, 3, dtype=torch.float64)
    ref = g1.ode_solve(x, flow, 1.0, 0.0)
    assert float((ref - g1.gaussian_ode_closed_form(x, flow, 1.0, 0.0)).abs().max()) < 1e-8


def test_sliced_wasserstein_separates_distributions():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 4, generator=g)
    b = torch.randn(2000, 4, generator=g)
    c = torch.randn(2000, 4, generator=g) + 1.0
    assert sliced_wasserstein(a, b) < 0.1 < 0.5 < sliced_wasserstein(a, c)


def test_bad_mixture_input():
    with pytest.raises(ValueError, match="eigvals must be positive"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no class labels"):
        GaussianMixture.ring().denoise(torch.zeros(2, 2), 0.5, 0.5, labels=torch.tensor([0, 1]))
