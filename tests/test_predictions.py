import math

import pytest
import torch

from difflab import predictions
from difflab.batch import per_sample

PREDS = predictions.available()


def _scales(process, t, x):
    return per_sample(process.alpha(t), x), per_sample(process.sigma(t), x)


@pytest.mark.parametrize("name", PREDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_target_conversion_round_trip(process, name, dtype):
    pred = predictions.get(name)
    g = torch.Generator().manual_seed(0)
    n = 256
    t = (process.t_min + (1 - process.t_min) * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    x0 = torch.randn(n, 3, generator=g, dtype=torch.float64).to(dtype)
    eps = torch.randn(n, 3, generator=g, dtype=torch.float64).to(dtype)
    a, s = _scales(process, t, x0)
    x = a * x0 + s * eps
    if pred.needs_alpha:
        keep = (a.flatten() > 1e-3)
        x0, eps, x, a, s = x0[keep], eps[keep], x[keep], a[keep], s[keep]
    out = pred.target(x0, eps, a, s)
    scale = 1.0 + s / a.clamp_min(1e-3)  # conversions amplify by at most ~ the noise level
    tol = (1e-9 if dtype == torch.float64 else 2e-4)
    assert ((pred.to_x0(out, x, a, s) - x0).abs() / scale).max() < tol
    assert ((pred.to_eps(out, x, a, s) - eps).abs() / (1 + a / s)).max() < tol
    assert ((pred.from_x0(x0, x, a, s) - out).abs() / scale).max() < tol * 10


@pytest.mark.parametrize("name", ["x0", "v", "flow", "edm"])
def test_finite_at_alpha_zero(name):
    """Where alpha = 0 (flow at t = 1, zero terminal SNR) these predictions still convert."""
    pred = predictions.get(name)
    x = torch.randn(5, 2, dtype=torch.float64)
    out = torch.randn(5, 2, dtype=torch.float64)
    a = torch.zeros(5, 1, dtype=torch.float64)
    s = torch.ones(5, 1, dtype=torch.float64)
    x0, eps = pred.to_x0(out, x, a, s), pred.to_eps(out, x, a, s)
    assert torch.isfinite(x0).all() and torch.isfinite(eps).all()
    torch.testing.assert_close(eps, x)  # at alpha = 0, x_t is pure noise: eps = x / sigma exactly


def test_eps_prediction_is_undefined_at_alpha_zero():
    pred = predictions.get("eps")
    x0 = pred.to_x0(torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, 1), torch.ones(1, 1))
    assert not torch.isfinite(x0).all()
    assert pred.needs_alpha


def test_edm_coefficients_match_paper_table():
    """c_skip, c_out, c_in of Karras et al. Table 1 in the VE form (alpha = 1)."""
    pred = predictions.get("edm", sigma_data=0.5)
    s = torch.tensor([[0.1], [1.0], [80.0]], dtype=torch.float64)
    a = torch.ones_like(s)
    skip, out, cin = pred._coefficients(a, s)
    sd = 0.5
    torch.testing.assert_close(skip, sd**2 / (s**2 + sd**2))
    torch.testing.assert_close(out, s * sd / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(cin, 1 / (s**2 + sd**2).sqrt())


def test_v_is_salimans_ho_for_vp():
    pred = predictions.get("v")
    phi = torch.tensor([[0.3]], dtype=torch.float64)
    a, s = phi.cos(), phi.sin()
    x0, eps = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    torch.testing.assert_close(pred.target(x0, eps, a, s), a * eps - s * x0)
    assert math.isclose(float(a**2 + s**2), 1.0)


def test_unknown_prediction_lists_choices():
    with pytest.raises(ValueError, match="eps, x0, v, flow, edm"):
        predictions.get("score")
