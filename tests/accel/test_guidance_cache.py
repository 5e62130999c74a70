"""Accelerators over the guidance branches (the guidance cache, T-GATE): exact when they refresh
every evaluation / gate after the last one, cheaper otherwise, no state from one run to the next,
composable with every sampler and guidance method, refused with a reason where they cannot apply."""

import pytest
import torch
from tests.conftest import perturb

import difflab
from difflab import accel, guidance, processes
from difflab.models import DiT, DiTConfig, UNet, UNetConfig

CONTEXT = torch.randn(3, 4, 12, generator=torch.Generator().manual_seed(2))
COND = {"context": CONTEXT}
UNCOND = {"context": torch.zeros(1, 4, 12)}
NOISE = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _perturbed(net, seed=0):
    torch.manual_seed(seed)
    return perturb(net, 0.05).eval()


@pytest.fixture(scope="module")
def dens():
    unet = _perturbed(UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                      attention_levels=(1,), head_dim=8, norm_groups=8, context_dim=12)))
    dit = _perturbed(DiT(DiTConfig(in_channels=1, patch_size=2, hidden_size=32, depth=3, num_heads=2,
                                   context_dim=12)))
    return {"unet": difflab.Denoiser(unet, processes.Flow(), "flow"),
            "dit": difflab.Denoiser(dit, processes.DiscreteVP.scaled_linear(), "eps")}


def _guided(den, method="cfg", weak=None):
    options = {"scale": 2.5, "uncond": UNCOND}
    if method == "pag":
        options["cfg_scale"] = 2.0
    if method == "autoguidance":
        options = {"scale": 2.0, "weak": weak}
    if method == "icg":
        options = {"scale": 2.0}
    return guidance.guide(den, method, **options)


def _sample(model, sampler="dpmpp_2m", steps=6):
    return difflab.sample(model, NOISE, sampler, steps=steps, cond=COND, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun", "unipc", "euler_ancestral"])
def test_refreshing_every_evaluation_and_a_gate_after_the_last_are_exact(dens, kind, sampler):
    den = dens[kind]
    with torch.no_grad():
        plain = _sample(_guided(den), sampler)
        with accel.guidance_cache(_guided(den), refresh=1) as fast:
            assert torch.equal(_sample(fast, sampler), plain)
        with accel.t_gate(_guided(den), gate=100) as gated:
            assert torch.equal(_sample(gated, sampler), plain)
    assert fast.report["branches_skipped"] == 0 and gated.report["gated"] == 0


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_skipping_branches_saves_flops_and_stays_close(dens, kind):
    den = dens[kind]
    with torch.no_grad():
        plain, full = accel.count_flops(lambda: _sample(_guided(den), steps=8))
        with accel.guidance_cache(_guided(den), refresh=2) as fast:
            cached, cached_flops = accel.count_flops(lambda: _sample(fast, steps=8))
        with accel.t_gate(_guided(den), gate=4) as gated:
            late, gated_flops = accel.count_flops(lambda: _sample(gated, steps=8))
    assert fast.report == {"evaluations": 8, "refreshes": 4, "branches_skipped": 4, "runs": 1}
    assert gated.report == {"evaluations": 8, "gated": 4, "runs": 1}
    assert cached_flops < 0.8 * full and gated_flops < 0.8 * full
    scale = float(plain.abs().max())
    for out in (cached, late):
        assert torch.isfinite(out).all() and not torch.equal(out, plain)
        assert float((out - plain).abs().max()) < 0.5 * scale


def test_no_state_leaks_from_one_run_to_the_next(dens):
    den = dens["unet"]
    with torch.no_grad():
        for make in (lambda g: accel.guidance_cache(g, refresh=[0, 3]), lambda g: accel.t_gate(g, gate=3)):
            with make(_guided(den)) as fast:
                first, second = _sample(fast), _sample(fast)
            with make(_guided(den)) as fresh:
                alone = _sample(fresh)
            assert torch.equal(first, second) and torch.equal(first, alone)
            assert fast.report["runs"] == 2
    assert all(a.processor.__name__ == "default_processor" for _, a in den.net.named_attention())


@pytest.mark.parametrize("method", guidance.available())
def test_every_guidance_method_takes_the_guidance_cache(dens, method):
    den = dens["unet"]
    weak = difflab.Denoiser(_perturbed(UNet(den.net.config), seed=1), den.process, "flow")
    with torch.no_grad():
        plain = _sample(_guided(den, method, weak))
        with accel.guidance_cache(_guided(den, method, weak), refresh=1) as fast:
            assert torch.equal(_sample(fast), plain), method
        with accel.guidance_cache(_guided(den, method, weak), refresh=3) as fast:
            assert torch.isfinite(_sample(fast)).all()
        with accel.t_gate(_guided(den, method, weak), gate=3) as gated:
            assert torch.isfinite(_sample(gated)).all() and gated.report["gated"] == 3


def test_what_cannot_apply_is_refused_with_a_reason(dens):
    with pytest.raises(ValueError, match="this denoiser has no guidance"):
        with accel.guidance_cache(dens["unet"]):
            pass
    labels = difflab.Denoiser(_perturbed(UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1,),
                                                         num_res_blocks=1, norm_groups=8, num_classes=3))),
                              processes.Flow(), "flow")
    with pytest.raises(ValueError, match="this network has none"):
        with accel.t_gate(guidance.guide(labels, "cfg", scale=2.0)):
            pass
    with pytest.raises(ValueError, match="at least 1"):
        with accel.t_gate(_guided(dens["unet"]), gate=0):
            pass


def test_a_pipeline_opens_guidance_accelerators_outside_its_guidance(tmp_path):
    from difflab.pipeline import Pipeline, PipelineError

    net = _perturbed(UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                     attention_levels=(1,), head_dim=8, norm_groups=8, num_classes=3)))
    pipe = Pipeline(net, processes.Flow(), "flow", sample_shape=(1, 8, 8), steps=6, num_classes=3, cond_dropout=0.1)
    plain = pipe(3, seed=0, guidance="cfg", guidance_options={"scale": 2.0})
    same = pipe(3, seed=0, guidance="cfg", guidance_options={"scale": 2.0},
                accelerator={"name": "guidance_cache", "refresh": 1})
    assert torch.equal(same.images, plain.images)
    fast = pipe(3, seed=0, guidance="cfg", guidance_options={"scale": 2.0},
                accelerator={"name": "guidance_cache", "refresh": 2})
    assert not torch.equal(fast.images, plain.images)
    assert fast.settings[1]["accelerator"] == {"name": "guidance_cache", "refresh": 2}
    assert torch.equal(pipe.reproduce(fast.settings[1]), fast.images[1])
    with pytest.raises((ValueError, PipelineError), match="has no guidance"):
        pipe(2, seed=0, guidance="none", accelerator={"name": "guidance_cache"})
