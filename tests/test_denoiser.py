import pytest
import torch

import difflab
from difflab import predictions, processes
from difflab.analytic import GaussianMixture


@pytest.mark.parametrize("name", ["eps", "x0", "v", "flow", "edm"])
def test_denoiser_recovers_x0_from_a_perfect_network(name):
    """A network that returns the exact target makes the denoiser return x0 exactly."""
    proc = processes.DiscreteVP.scaled_linear()
    pred = predictions.get(name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x = proc.add_noise(x0, eps, t)
    seen = {}

    def net(inp, time):
        seen["time"] = time
        a = proc.alpha(t).reshape(-1, 1, 1, 1)
        s = proc.sigma(t).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(inp, pred.input_scale(a, s) * x)
        return pred.target(x0, eps, a, s)

    den = difflab.Denoiser(net, proc, name)
    torch.testing.assert_close(den(x, t), x0)
    torch.testing.assert_close(den.eps(x, t), eps)
    torch.testing.assert_close(den.velocity(x, t), eps - x0)
    torch.testing.assert_close(seen["time"], proc.model_time(t))


def test_from_fn_with_continuous_time_and_scalar_t():
    proc = processes.Flow()
    mix = GaussianMixture.ring()
    den = mix.denoiser(proc, "flow")
    x = torch.randn(7, 2, dtype=torch.float64)
    a, s = proc.alpha(0.4), proc.sigma(0.4)
    torch.testing.assert_close(den(x, 0.4), mix.denoise(x, a, s))


def test_eps_with_zero_terminal_snr_is_refused():
    proc = processes.DiscreteVP.scaled_linear(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="'v', 'x0'"):
        difflab.Denoiser(lambda x, t: x, proc, "eps")
    with pytest.raises(ValueError, match="alpha"):
        difflab.Denoiser(lambda x, t: x, processes.Flow(), "eps")
    difflab.Denoiser(lambda x, t: x, proc, "v")  # fine


def test_bad_shapes_are_named():
    proc = processes.Flow()
    den = difflab.Denoiser(lambda x, t: x[:, :1], proc, "flow")
    with pytest.raises(ValueError, match="shape"):
        den(torch.zeros(2, 3), 0.5)
    den = difflab.Denoiser(lambda x, t: x, proc, "flow")
    with pytest.raises(ValueError, match="one value per sample"):
        den(torch.zeros(2, 3), torch.rand(5))
    with pytest.raises(ValueError, match="unknown prediction"):
        difflab.Denoiser(lambda x, t: x, proc, "noise")
    with pytest.raises(TypeError, match="Process"):
        difflab.Denoiser(lambda x, t: x, "flow", "flow")
