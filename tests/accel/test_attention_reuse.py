"""Attention reuse (DiTFastAttn's sharing across steps and across guidance branches): exact when it
refreshes every evaluation, exact across branches whose inputs agree, cheaper otherwise, no state
from one run to the next, composable with every sampler and guidance method."""

import pytest
import torch
from tests.conftest import perturb

import difflab
from difflab import accel, guidance, processes
from difflab.models import MLP, DiT, DiTConfig, MLPConfig, UNet, UNetConfig

NOISE = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
LABELS = {"class_labels": torch.tensor([0, 1, 2])}


def _net(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "unet":
        net = UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                              attention_levels=(1,), head_dim=8, norm_groups=8, num_classes=3))
    else:
        net = DiT(DiTConfig(in_channels=1, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=3))
    return perturb(net, 0.05).eval()


@pytest.fixture(scope="module")
def dens():
    return {"unet": difflab.Denoiser(_net("unet"), processes.Flow(), "flow"),
            "dit": difflab.Denoiser(_net("dit"), processes.DiscreteVP.scaled_linear(), "eps")}


def _sample(model, sampler="dpmpp_2m", steps=6, cond=LABELS):
    return difflab.sample(model, NOISE, sampler, steps=steps, cond=cond, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("sampler", difflab.samplers.available())
def test_refreshing_every_evaluation_is_exact(dens, kind, sampler):
    den = dens[kind]
    with torch.no_grad():
        with accel.attention_reuse(den, refresh=1) as fast:
            assert torch.equal(_sample(fast, sampler), _sample(den, sampler)), sampler
        with accel.attention_reuse(den, refresh=3) as fast:
            cached = _sample(fast, sampler)
    assert torch.isfinite(cached).all() and fast.report["layer_reuses"] > 0


def test_branches_with_equal_inputs_share_exactly_and_sharing_saves_flops(dens):
    den = dens["dit"]
    same = guidance.guide(den, "cfg", scale=3.0, uncond=LABELS)  # both branches see the same condition
    other = guidance.guide(den, "cfg", scale=3.0)  # the null class
    with torch.no_grad():
        with accel.attention_reuse(same, refresh=1, share_branches=True) as shared:
            assert torch.equal(_sample(shared), _sample(same))
        _, full = accel.count_flops(lambda: _sample(other))
        with accel.attention_reuse(other, refresh=1, share_branches=True) as shared:
            _, fewer = accel.count_flops(lambda: _sample(shared))
            out = _sample(shared)
        with accel.attention_reuse(other, refresh=3) as cached:
            _, reused = accel.count_flops(lambda: _sample(cached))
    assert fewer < full and reused < fewer
    assert not torch.equal(out, _sample(other)) and (out - _sample(other)).abs().max() < 0.5


def test_no_state_leaks_from_one_run_to_the_next(dens):
    den = dens["unet"]
    with torch.no_grad():
        with accel.attention_reuse(den, refresh=2) as fast:
            first, second = _sample(fast), _sample(fast)
        with accel.attention_reuse(den, refresh=2) as fresh:
            again = _sample(fresh)
    assert torch.equal(first, second) and torch.equal(first, again)
    assert fast.report["runs"] == 2


@pytest.mark.parametrize("method", guidance.available())
def test_every_guidance_method_takes_attention_reuse(dens, method):
    den = dens["unet"]
    weak = difflab.Denoiser(_net("unet", seed=1), den.process, "flow")
    options = {"autoguidance": {"scale": 2.0, "weak": weak}, "pag": {"scale": 2.0, "cfg_scale": 2.0},
               "icg": {"scale": 2.0, "num_classes": 3}}.get(method, {"scale": 2.0})
    with torch.no_grad():
        guided = guidance.guide(den, method, **options)
        with accel.attention_reuse(guided, refresh=1) as fast:
            assert torch.equal(_sample(fast), _sample(guided)), method
        with accel.attention_reuse(guided, refresh=2, share_branches=True) as fast:
            assert torch.isfinite(_sample(fast)).all()


def test_what_cannot_apply_is_refused_with_a_reason(dens):
    with pytest.raises(ValueError, match="needs a guided denoiser"):
        with accel.attention_reuse(dens["unet"], share_branches=True):
            pass
    plain = difflab.Denoiser(MLP(MLPConfig(dim=2, hidden=16, depth=2)), processes.Flow(), "flow")
    with pytest.raises(ValueError, match="no self attention layers"):
        with accel.attention_reuse(plain):
            pass
    with pytest.raises(ValueError, match="has no self attention layer"):
        with accel.attention_reuse(dens["dit"], layers=["block.9/0"]):
            pass


def test_a_pipeline_opens_attention_reuse_outside_its_guidance():
    from difflab.pipeline import Pipeline

    pipe = Pipeline(_net("dit"), processes.Flow(), "flow", sample_shape=(1, 8, 8), steps=6, num_classes=3,
                    cond_dropout=0.1, guidance={"method": "cfg", "options": {"scale": 2.0}})
    plain = pipe(3, seed=0)
    assert torch.equal(pipe(3, seed=0, accelerator={"name": "attention_reuse", "refresh": 1}).images, plain.images)
    fast = pipe(3, seed=0, accelerator={"name": "attention_reuse", "refresh": 2, "share_branches": True})
    assert not torch.equal(fast.images, plain.images)
    assert torch.equal(pipe.reproduce(fast.settings[1]), fast.images[1])
