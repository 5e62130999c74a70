import pytest
import torch

from difflab import predictions, processes
from difflab.analytic import GaussianMixture
from difflab.training.losses import diffusion_loss, drop_condition, immiscible_noise, loss_weight

PREDS = ["eps", "x0", "v", "flow", "edm"]


def _noisy_net(mix, process, prediction, bias):
    """A denoiser net whose x0 estimate is the exact posterior mean plus a fixed error ``bias``."""
    pred = predictions.get(prediction)

    def net_with_t(x_in, model_time, t):
        a = process.alpha(t).reshape(-1, 1).to(x_in.dtype)
        s = process.sigma(t).reshape(-1, 1).to(x_in.dtype)
        x = x_in / pred.input_scale(a, s)
        x0_hat = mix.denoise(x, a.flatten(), s.flatten()) + bias
        return pred.from_x0(x0_hat, x, a, s)

    return net_with_t


@pytest.mark.parametrize("weighting", ["min_snr", "edm"])
@pytest.mark.parametrize("proc", [processes.DiscreteVP.scaled_linear(), processes.Flow(), processes.EDM()], ids=str)
def test_a_weighting_means_the_same_for_every_prediction(weighting, proc):
    """With the same x0 error, every prediction's weighted loss equals the x0-space weighted error."""
    mix = GaussianMixture.ring()
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(64, generator=g, dtype=torch.float64)
    t = (proc.t_min + (1 - proc.t_min) * torch.rand(64, generator=g, dtype=torch.float64)) * 0.98
    noise = torch.randn(64, 2, generator=g, dtype=torch.float64)
    bias = torch.tensor([0.1, -0.2], dtype=torch.float64)
    losses = {}
    for name in PREDS:
        if name == "eps" and proc.name == "flow":
            continue
        net = _noisy_net(mix, proc, name, bias)
        losses[name] = diffusion_loss(lambda x, mt, net=net: net(x, mt, t), x0, proc, name, t=t, noise=noise,
                                      weighting=weighting)
    for name, value in losses.items():
        torch.testing.assert_close(value, losses["x0"], rtol=1e-6, atol=1e-9, msg=name)


def test_min_snr_matches_hang_et_al_for_eps_and_v():
    proc = processes.DiscreteVP.linear()
    t = torch.tensor([0.01, 0.2, 0.9], dtype=torch.float64)
    a, s = proc.alpha(t), proc.sigma(t)
    snr = (a / s) ** 2
    w_eps = loss_weight("min_snr", predictions.get("eps"), a, s, gamma=5.0)
    w_v = loss_weight("min_snr", predictions.get("v"), a, s, gamma=5.0)
    torch.testing.assert_close(w_eps, snr.clamp(max=5.0) / snr)
    torch.testing.assert_close(w_v, snr.clamp(max=5.0) / (snr + 1))


def test_edm_weighting_is_unweighted_for_the_edm_prediction():
    proc = processes.EDM()
    t = torch.tensor([0.001, 0.1, 0.7], dtype=torch.float64)
    w = loss_weight("edm", predictions.get("edm"), proc.alpha(t), proc.sigma(t))
    torch.testing.assert_close(w, torch.ones_like(w))


def test_condition_dropout_and_immiscible_assignment():
    labels = torch.arange(10).repeat(100)
    dropped = drop_condition(labels, 0.1, torch.Generator().manual_seed(0))
    frac = float((dropped == -1).float().mean())
    assert 0.07 < frac < 0.13 and bool(((dropped == labels) | (dropped == -1)).all())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(32, 3, 4, 4, generator=g), torch.randn(32, 3, 4, 4, generator=g)
    paired = immiscible_noise(x0, noise)
    assert sorted(paired.flatten().tolist()) == sorted(noise.flatten().tolist())
    assert float((x0 - paired).pow(2).sum()) < float((x0 - noise).pow(2).sum())
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weight("p2", predictions.get("eps"), torch.ones(1), torch.ones(1))
