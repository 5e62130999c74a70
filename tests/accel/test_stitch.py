"""T-Stitch: the small network on the early steps, the large one after; exact at either end, per
sample in a mixed batch, composable with every sampler and guidance method, refused where the two
networks do not fit together."""

import itertools

import pytest
import torch
from tests.conftest import perturb

import difflab
from difflab import accel, guidance, processes
from difflab.analytic import GaussianMixture
from difflab.models import UNet, UNetConfig
from difflab.pipeline import Pipeline, PipelineError

NOISE = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
LABELS = {"class_labels": torch.tensor([0, 1, 2])}


def _unet(channels, seed):
    torch.manual_seed(seed)
    return perturb(UNet(UNetConfig(in_channels=1, model_channels=channels, channel_mult=(1, 2), num_res_blocks=1,
                                   attention_levels=(1,), head_dim=8, norm_groups=8, num_classes=3)), 0.05).eval()


@pytest.fixture(scope="module")
def pair():
    return (difflab.Denoiser(_unet(16, 0), processes.Flow(), "flow"),
            difflab.Denoiser(_unet(8, 1), processes.Flow(), "flow"))


def _sample(model, sampler="dpmpp_2m", steps=6):
    return difflab.sample(model, NOISE, sampler, steps=steps, cond=LABELS, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("sampler", difflab.samplers.available())
def test_the_switch_at_either_end_is_one_network_bit_for_bit(pair, sampler):
    large, small = pair
    with torch.no_grad():
        for switch, alone in ((1.0, large), (0.0, small)):
            with accel.t_stitch(large, small, switch=switch) as stitched:
                assert torch.equal(_sample(stitched, sampler), _sample(alone, sampler)), (sampler, switch)
        with accel.t_stitch(large, small, switch=0.5) as stitched:
            mixed = _sample(stitched, sampler)
    assert not torch.equal(mixed, _sample(large, sampler)) and torch.isfinite(mixed).all()
    assert stitched.report["small_samples"] > 0 and stitched.report["large_samples"] > 0


def test_each_sample_is_denoised_by_the_network_its_time_selects(pair):
    large, small = pair
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.9, 0.2, 0.7, 0.4])
    labels = torch.tensor([0, 1, 2, 0])
    with torch.no_grad(), accel.t_stitch(large, small, switch=0.5) as stitched:
        out = stitched(x, t, class_labels=labels)
        for i in range(4):
            den = small if t[i] > 0.5 else large
            assert torch.allclose(out[i], den(x[i:i + 1], t[i:i + 1], class_labels=labels[i:i + 1])[0], atol=1e-6)


def test_more_of_the_small_network_moves_further_from_the_large_ones_ode_solution():
    """On an exact mixture: a coarse "small" denoiser (a wider mixture) early on costs little at high
    noise, where the two posteriors nearly agree, and more the further the switch moves down."""
    mixture = GaussianMixture.ring()
    coarse = GaussianMixture(mixture.log_weights.exp(), mixture.means * 0.9, mixture.eigvals * 4.0, mixture.eigvecs)
    process = processes.Flow()
    exact, rough = mixture.denoiser(process, "flow"), coarse.denoiser(process, "flow")
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    target = difflab.sample(exact, noise, "dpmpp_2m", steps=40, schedule="trailing")
    errors = []
    for switch in (1.0, 0.8, 0.5, 0.2, 0.0):
        with accel.t_stitch(exact, rough, switch=switch) as stitched:
            out = difflab.sample(stitched, noise, "dpmpp_2m", steps=40, schedule="trailing")
        errors.append(float((out - target).pow(2).mean().sqrt()))
    assert errors[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(errors)), errors
    assert errors[1] < 0.25 * errors[-1], errors  # the high-noise steps are the cheap ones to hand over


@pytest.mark.parametrize("method", guidance.available())
def test_every_guidance_method_guides_each_stitched_network(pair, method):
    large, small = pair
    weak = difflab.Denoiser(_unet(16, 2), large.process, "flow")
    options = {"autoguidance": {"scale": 2.0, "weak": weak}, "pag": {"scale": 2.0, "cfg_scale": 2.0},
               "icg": {"scale": 2.0, "num_classes": 3}}.get(method, {"scale": 2.0})
    with torch.no_grad():
        guided_large, guided_small = guidance.guide(large, method, **options), guidance.guide(small, method, **options)
        with accel.t_stitch(guided_large, guided_small, switch=1.0) as stitched:
            assert torch.equal(_sample(stitched), _sample(guided_large)), method
        with accel.t_stitch(guided_large, guided_small, switch=0.0) as stitched:
            assert torch.equal(_sample(stitched), _sample(guided_small)), method
        with accel.t_stitch(guided_large, guided_small, switch=0.6) as stitched:
            assert torch.isfinite(_sample(stitched)).all()


def test_networks_that_do_not_fit_together_are_refused(pair):
    large, small = pair
    other = difflab.Denoiser(small.net, processes.DiscreteVP.scaled_linear(), "eps")
    with pytest.raises(ValueError, match="share the noise process"):
        with accel.t_stitch(large, other):
            pass
    with pytest.raises(ValueError, match="switch is the time"):
        with accel.t_stitch(large, small, switch=1.5):
            pass
    with pytest.raises(ValueError, match="small must be a difflab denoiser"):
        with accel.t_stitch(large, "small"):
            pass


def test_a_pipeline_stitches_a_small_pipeline_folder_and_reproduces_it(tmp_path):
    from difflab.cli import main

    def pipe_of(channels, seed):
        return Pipeline(_unet(channels, seed), processes.Flow(), "flow", sample_shape=(1, 8, 8), steps=6,
                        num_classes=3, schedule="trailing")

    pipe, small = pipe_of(16, 0), pipe_of(8, 1)
    small.save_pretrained(tmp_path / "small")
    plain = pipe(3, seed=0)
    config = {"name": "t_stitch", "small": str(tmp_path / "small"), "switch": 0.5}
    fast = pipe(3, seed=0, accelerator=config)
    assert not torch.equal(fast.images, plain.images)
    assert fast.settings[0]["accelerator"] == config
    assert torch.equal(pipe.reproduce(fast.settings[2]), fast.images[2])
    assert torch.equal(pipe(3, seed=0, accelerator={**config, "switch": 1.0}).images, plain.images)
    assert torch.equal(pipe(3, seed=0, accelerator={**config, "switch": 0.0}).images, small(3, seed=0).images)
    in_memory = pipe(3, seed=0, accelerator={**config, "small": small})
    assert torch.equal(in_memory.images, fast.images)
    assert in_memory.settings[0]["accelerator"]["small"] == f"pipeline {small.identity()}"
    pipe.save_pretrained(tmp_path / "pipe")
    assert main(["sample", str(tmp_path / "pipe"), "--n", "2", "--accelerator", "t_stitch", "--accelerator-option",
                 f"small={tmp_path / 'small'}", "--accelerator-option", "switch=0.5", "--out", str(tmp_path / "s"),
                 "--no-progress"]) == 0
    text = Pipeline(_unet(8, 1), processes.Flow(), "flow", sample_shape=(1, 8, 8), steps=6, num_classes=None)
    with pytest.raises(PipelineError, match="same conditions"):
        pipe(2, accelerator={**config, "small": text})
