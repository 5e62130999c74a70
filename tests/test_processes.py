import math

import pytest
import torch

from difflab import processes as P


def test_clean_endpoint_and_terminal(process):
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert process.alpha(t)[0] == 1.0 and process.sigma(t)[0] == 0.0
    assert process.logsnr(t)[0] == math.inf
    assert bool((process.alpha(t) >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logsnr_inverse_round_trip(process, dtype):
    g = torch.Generator().manual_seed(0)
    t = process.t_min + (1 - process.t_min) * torch.rand(2000, generator=g, dtype=torch.float64)
    t = torch.cat([t, torch.tensor([process.t_min, 0.5, 0.999], dtype=torch.float64)]).to(dtype)
    lam = process.logsnr(t)
    finite = torch.isfinite(lam)
    back = process.t_from_logsnr(lam[finite])
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert back.dtype == dtype
    torch.testing.assert_close(back, t[finite], atol=tol, rtol=0)
    # noise level is the VE form sigma / alpha and inverts too
    lev = process.noise_level(t[finite])
    torch.testing.assert_close(lev, process.sigma(t[finite]) / process.alpha(t[finite]), rtol=1e-5, atol=0)
    torch.testing.assert_close(process.t_from_noise_level(lev), t[finite], atol=tol * 10, rtol=0)


def test_logsnr_strictly_decreasing(process):
    t = torch.linspace(0, 1, 4001, dtype=torch.float64)
    lam = process.logsnr(t)
    assert bool((lam[1:] < lam[:-1]).all())


def test_variance_preserving_where_claimed(process):
    if process.name in ("ve", "edm", "flow"):
        pytest.skip("not variance preserving")
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(process.alpha(t) ** 2 + process.sigma(t) ** 2, torch.ones_like(t))


def test_discrete_vp_matches_published_beta_formulas():
    n = 1000
    lin = P.DiscreteVP.linear()
    i = torch.arange(n, dtype=torch.float64)
    torch.testing.assert_close(lin.betas, 1e-4 + (0.02 - 1e-4) * i / (n - 1))
    sd = P.DiscreteVP.scaled_linear()
    torch.testing.assert_close(sd.betas.sqrt(), 0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / (n - 1))
    cos = P.DiscreteVP.cosine()

    def f(x):
        return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = torch.tensor([min(1 - f((k + 1) / n) / f(k / n), 0.999) for k in range(n)], dtype=torch.float64)
    torch.testing.assert_close(cos.betas, expected)
    # alpha-bar is the running product of (1 - beta), and the process is exact at every knot
    for proc in (lin, sd, cos):
        abar = torch.cumprod(1 - proc.betas, 0)
        torch.testing.assert_close(proc.alphas_cumprod, abar)
        knots = (i + 1) / n
        torch.testing.assert_close(proc.alpha(knots) ** 2, abar)
        torch.testing.assert_close(proc.model_time(knots), i)
    # Stable Diffusion's well-known terminal value
    assert abs(float(sd.alphas_cumprod[-1]) - 0.0046) < 2e-4


def test_zero_terminal_snr_rescale():
    base = P.DiscreteVP.scaled_linear()
    z = P.DiscreteVP.scaled_linear(zero_terminal_snr=True)
    assert float(z.alpha(1.0)) == 0.0 and float(z.sigma(1.0)) == 1.0
    torch.testing.assert_close(z.alphas_cumprod[0], base.alphas_cumprod[0])
    assert z.logsnr(1.0) == -math.inf
    # Lin et al.: sqrt(alpha-bar) is an affine map of the original
    a, b = base.alphas_cumprod.sqrt(), z.alphas_cumprod.sqrt()
    slope = (b[1:] - b[:-1]) / (a[1:] - a[:-1])
    torch.testing.assert_close(slope, slope[0].expand_as(slope))
    # the last segment (infinite log noise level at its end) still inverts exactly
    t = torch.tensor([0.9995, 0.99999], dtype=torch.float64)
    torch.testing.assert_close(z.t_from_logsnr(z.logsnr(t)), t, atol=1e-12, rtol=0)


def test_flow_shift_and_resolution():
    f = P.Flow(shift=3.0)
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    s = 3 * t / (1 + 2 * t)
    torch.testing.assert_close(f.sigma(t), s)
    torch.testing.assert_close(f.alpha(t), 1 - s)
    torch.testing.assert_close(f.model_time(t), 1000 * s)
    assert P.Flow.for_resolution(1024 * 1024).shift == pytest.approx(4.0)
    assert P.Flow.for_sequence_length(4096).shift == pytest.approx(math.exp(1.15))


def test_edm_and_ve():
    e = P.EDM()
    assert float(e.sigma(1.0)) == 80.0 and e.t_min == pytest.approx(0.002 / 80)
    torch.testing.assert_close(e.model_time(torch.tensor(0.5, dtype=torch.float64)),
                               torch.tensor(math.log(40.0) / 4, dtype=torch.float64))


@pytest.mark.parametrize("distribution", ["uniform", "logit_normal", "log_normal"])
def test_sample_t_in_range(process, distribution):
    g = torch.Generator().manual_seed(0)
    t = process.sample_t(4000, distribution=distribution, generator=g)
    assert t.dtype == torch.float32 and t.shape == (4000,)
    assert float(t.min()) >= process.t_min * (1 - 1e-6) and float(t.max()) <= 1.0


def test_sample_t_discrete_and_log_normal_law():
    sd = P.DiscreteVP.scaled_linear()
    t = sd.sample_t(5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    idx = sd.model_time(t)
    torch.testing.assert_close(idx, idx.round())
    assert 0 <= float(idx.min()) and float(idx.max()) <= 999
    edm = P.EDM()
    t = edm.sample_t(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_sigma = edm.sigma(t).log()
    inside = (t > edm.t_min) & (t < 1)  # clamping only touches the tails
    assert abs(float(log_sigma[inside].mean()) + 1.2) < 0.05
    with pytest.raises(ValueError, match="discrete"):
        P.Flow().sample_t(4, distribution="discrete")


def test_config_round_trip(process):
    rebuilt = P.from_config(process.to_config())
    assert rebuilt == process
    t = torch.linspace(0, 1, 17, dtype=torch.float64)
    torch.testing.assert_close(rebuilt.alpha(t), process.alpha(t))
    custom = P.DiscreteVP.from_betas(torch.linspace(1e-4, 0.03, 50, dtype=torch.float64))
    assert P.from_config(custom.to_config()) == custom


def test_bad_names_list_choices():
    with pytest.raises(ValueError, match="scaled_linear"):
        P.get("nope")
    with pytest.raises(ValueError, match="linear, scaled_linear"):
        P.make_betas("quadratic")
    with pytest.raises(ValueError, match="choose one of"):
        P.from_config({"kind": "mystery"})
    with pytest.raises(ValueError, match="log_normal"):
        P.Flow().sample_t(3, distribution="gamma")
    with pytest.raises(ValueError, match="one value per sample"):
        P.Flow().add_noise(torch.zeros(4, 2), torch.zeros(4, 2), torch.rand(3))
