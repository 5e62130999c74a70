"""Inversion with any deterministic sampler, its fixed-point refinement, and null-text inversion."""

import math

import pytest
import torch

from difflab import analytic, editing, guidance, processes, samplers
from difflab.models import UNet, UNetConfig

# bns: coefficients belong to the descending grid they were fitted on (its rows cannot reach alpha = 0 upward)
DETERMINISTIC = [s for s in samplers.available() if samplers.deterministic(s) and s not in ("adaptive", "bns")]


def psnr(a, b):
    return 10 * math.log10(float((b.max() - b.min()) ** 2 / ((a - b) ** 2).mean()))


def _mixture(process, prediction):
    mix = analytic.GaussianMixture.low_rank(dim=32, num_components=6, rank=3)
    return mix.denoiser(process, prediction), mix.sample(8, generator=torch.Generator().manual_seed(1)).double()


@pytest.mark.parametrize("sampler", DETERMINISTIC)
@pytest.mark.parametrize("kind", ["vp_eps", "flow"])
def test_every_deterministic_sampler_inverts_its_own_run(sampler, kind):
    vp = kind == "vp_eps"
    process, prediction = (processes.DiscreteVP.scaled_linear(), "eps") if vp else (processes.Flow(), "flow")
    den, image = _mixture(process, prediction)
    inv = editing.invert(den, image, sampler, 50, "karras")
    back = inv.sample(den)
    assert psnr(back, image) >= 30, (sampler, kind, psnr(back, image))
    again = samplers.sample(den, inv.noise, sampler, 50, "karras")  # the inverted noise is sample()'s noise
    torch.testing.assert_close(again, back)
    assert psnr(samplers.sample(den, torch.randn_like(image), sampler, 50, "karras"), image) < 15


def test_ddim_inversion_converges_with_steps_and_refinement():
    den, image = _mixture(processes.DiscreteVP.scaled_linear(), "eps")
    quality = [psnr(editing.invert(den, image, "ddim", n).sample(den), image) for n in (10, 50, 200)]
    assert quality[0] < quality[1] < quality[2] and quality[1] >= 30
    refined = [editing.invert(den, image, "ddim", 10, refine=k) for k in (0, 1, 3)]
    scores = [psnr(inv.sample(den), image) for inv in refined]
    assert scores[0] < scores[1] < scores[2], scores
    assert [inv.nfe for inv in refined] == [10, 20, 40]
    inv = refined[0]
    assert len(inv.trajectory) == 11 and inv.trajectory[0] is inv.state and torch.equal(inv.trajectory[-1], image)


def test_partial_inversion_starts_at_the_strength():
    den, image = _mixture(processes.Flow(), "flow")
    inv = editing.invert(den, image, "ddim", 20, "uniform", strength=0.5)
    assert float(inv.ts[0]) == 0.5 and len(inv.ts) == 12
    assert psnr(inv.sample(den), image) > 40


@pytest.mark.parametrize("sampler,options", [("ddpm", {}), ("euler_ancestral", {}), ("ddim", {"eta": 0.5}),
                                             ("euler", {"s_churn": 1.0}), ("dpmpp_2m_sde", {}), ("adaptive", {})])
def test_a_run_that_cannot_be_retraced_is_refused_with_the_reason(sampler, options):
    den, image = _mixture(processes.Flow(), "flow")
    with pytest.raises(editing.EditError, match=r"noise|own steps"):
        editing.invert(den, image, sampler, 10, **options)


def test_null_text_inversion_makes_guided_sampling_reconstruct():
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=2, model_channels=16, channel_mult=(1,), num_res_blocks=1,
                          attention_levels=(0,), head_dim=8, norm_groups=8, context_dim=12)).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.15)
    import difflab

    den = difflab.Denoiser(net, processes.DiscreteVP.scaled_linear(), "eps")
    g = torch.Generator().manual_seed(1)
    cond = {"context": torch.randn(3, 5, 12, generator=g), "context_mask": torch.ones(3, 5, dtype=torch.bool)}
    uncond = {"context": torch.zeros(1, 5, 12), "context_mask": torch.tensor([[True, True, False, False, False]])}
    image = torch.randn(3, 2, 8, 8, generator=g).clamp(-1, 1)
    inv = editing.invert(den, image, "ddim", 20, cond=cond)
    plain = psnr(inv.sample(guidance.guide(den, "cfg", scale=5.0, uncond=uncond), cond=cond), image)
    nt = editing.null_text_inversion(den, image, cond, uncond=uncond, scale=5.0, steps=20, tolerance=0.0)
    assert len(nt.unconds) == 20 and nt.unconds[0]["context"].shape == (3, 5, 12)
    assert psnr(nt.sample(den), image) > plain + 5
    with pytest.raises(editing.EditError, match="not on it"):
        nt.denoiser(den)(image, torch.full((3,), 0.123), **cond)
