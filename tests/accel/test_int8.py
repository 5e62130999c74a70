"""Int8 inference: the integer linear layer is the exact product of its quantized operands, the
quantized network stays close to the float one, timestep-aware ranges fit better than one range,
the calibration is deterministic and travels in the pipeline folder, every layer is restored."""

import json

import pytest
import torch
from tests.conftest import perturb

import difflab
from difflab import accel, guidance, processes
from difflab.accel.int8 import DynamicInt8Linear, quantize_weight
from difflab.models import DiT, DiTConfig, UNet, UNetConfig
from difflab.pipeline import Pipeline, PipelineError

NOISE = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
LABELS = {"class_labels": torch.tensor([0, 1, 2, 0, 1, 2])}


def _unet(seed=0):
    torch.manual_seed(seed)
    return perturb(UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                   attention_levels=(1,), head_dim=8, norm_groups=8, num_classes=3)), 0.05).eval()


@pytest.fixture(scope="module")
def den():
    return difflab.Denoiser(_unet(), processes.Flow(), "flow")


def _sample(model, sampler="dpmpp_2m", steps=6, rows=slice(None)):
    return difflab.sample(model, NOISE[rows], sampler, steps=steps, schedule="trailing",
                          cond={"class_labels": LABELS["class_labels"][rows]},
                          generator=torch.Generator().manual_seed(4))


def _calibrate(den, intervals=4):
    return accel.calibrate_int8(den, lambda d: _sample(d, rows=slice(0, 3)), intervals=intervals)


def test_the_integer_layer_is_the_exact_product_of_its_int8_operands():
    layer = torch.nn.Linear(40, 24)
    x = torch.randn(5, 7, 40)
    out = DynamicInt8Linear(layer)(x)
    q, w_scale = quantize_weight(layer.weight)
    rows = x.reshape(-1, 40)
    x_scale = rows.abs().amax(1, keepdim=True) / 127
    xq = torch.round(rows / x_scale).clamp(-127, 127)
    exact = (xq.double() @ q.double().t()) * x_scale.double() * w_scale.double() + layer.bias.double()
    assert torch.allclose(out.reshape(-1, 24).double(), exact, rtol=1e-6, atol=1e-6)
    reference = layer(x)
    assert 0 < (out - reference).abs().max() < 0.02 * reference.abs().max()


def test_int8_sampling_stays_close_and_every_layer_is_restored(den):
    before = {n: type(m).forward for n, m in den.net.weight_layers().items()}
    with torch.no_grad():
        plain = _sample(den)
        with accel.int8(den) as linear:
            lin = _sample(linear)
        with accel.int8(den, _calibrate(den)) as both:
            full = _sample(both)
    scale = plain.abs().max()
    assert 0 < (lin - plain).abs().max() < 0.02 * scale
    assert 0 < (full - plain).abs().max() < 0.1 * scale
    assert both.report["layers"] == len(den.net.weight_layers()) > linear.report["layers"]
    assert both.report["int8_bytes"] < 0.3 * both.report["float_bytes"]
    assert all("forward" not in vars(m) for m in den.net.weight_layers().values())
    assert torch.equal(_sample(den), plain) and before == {n: type(m).forward for n, m in
                                                           den.net.weight_layers().items()}


def test_ranges_per_time_interval_fit_better_than_one_range(den):
    """Each interval's range lies inside the single range (activations move with the noise level),
    and on the states calibrated on, the finer ranges give the smaller error (trained: bench/accel.py)."""
    states = []

    def keep(i, t, x, denoised):
        states.append((x.clone(), t))

    with torch.no_grad():
        difflab.sample(den, NOISE, "euler", steps=6, schedule="trailing", cond=LABELS, callback=keep)
        calibrations = {n: accel.calibrate_int8(den, lambda d: difflab.sample(d, NOISE, "euler", steps=6,
                                                                            schedule="trailing", cond=LABELS),
                                                intervals=n) for n in (1, 6)}
        errors = {}
        for intervals, calibration in calibrations.items():
            with accel.int8(den, calibration, linear=False) as q:
                errors[intervals] = [float((q(x, t, **LABELS) - den(x, t, **LABELS)).pow(2).mean())
                                     for x, t in states]
    assert sum(errors[6]) < sum(errors[1]), errors
    for name, (whole,) in calibrations[1]["ranges"].items():
        parts = torch.tensor(calibrations[6]["ranges"][name])
        assert bool((parts[:, 0] >= whole[0] - 1e-6).all() and (parts[:, 1] <= whole[1] + 1e-6).all()), name


def test_calibration_is_deterministic_plain_data_and_checked(den):
    first, second = _calibrate(den), _calibrate(den)
    assert json.loads(json.dumps(first)) == first == second
    assert first["intervals"] == 4 and all(len(r) == 4 for r in first["ranges"].values())
    other = difflab.Denoiser(perturb(UNet(UNetConfig(in_channels=1, model_channels=8, channel_mult=(1,),
                                                     num_res_blocks=1, norm_groups=4, num_classes=3)), 0.05),
                             processes.Flow(), "flow")
    with pytest.raises(ValueError, match="made for another network"):
        with accel.int8(other, first):
            pass
    with pytest.raises(ValueError, match="what calibrate_int8 returns"):
        with accel.int8(den, {"ranges": {}}):
            pass
    with pytest.raises(ValueError, match="nothing to quantize"):
        with accel.int8(den, linear=False):
            pass
    with pytest.raises(ValueError, match="has none"):
        with accel.int8(difflab.Denoiser.from_fn(lambda x, t: x, processes.Flow(), "x0")):
            pass
    dit = difflab.Denoiser(DiT(DiTConfig(in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2)),
                           processes.Flow(), "flow")
    with torch.no_grad(), accel.int8(dit) as q:  # a transformer is all linear layers
        assert torch.isfinite(_sample(q, rows=slice(0, 2))).all() and q.report["layers"] > 0


@pytest.mark.parametrize("sampler", difflab.samplers.available())
def test_int8_takes_every_sampler(den, sampler):
    calibration = _calibrate(den)
    with torch.no_grad(), accel.int8(den, calibration) as q:
        assert torch.isfinite(_sample(q, sampler, rows=slice(0, 2))).all()


@pytest.mark.parametrize("method", guidance.available())
def test_int8_takes_every_guidance_method(den, method):
    weak = difflab.Denoiser(_unet(seed=2), den.process, "flow")
    options = {"autoguidance": {"scale": 2.0, "weak": weak}, "pag": {"scale": 2.0, "cfg_scale": 2.0},
               "icg": {"scale": 2.0, "num_classes": 3}}.get(method, {"scale": 2.0})
    with torch.no_grad(), accel.int8(den, _calibrate(den)) as q:
        assert torch.isfinite(_sample(guidance.guide(q, method, **options), rows=slice(0, 2))).all()


def test_a_pipeline_calibrates_keeps_and_uses_its_int8_ranges(tmp_path):
    from difflab.cli import main

    pipe = Pipeline(_unet(), processes.Flow(), "flow", sample_shape=(1, 8, 8), steps=6, num_classes=3,
                    schedule="trailing", cond_dropout=0.1, guidance={"method": "cfg", "options": {"scale": 2.0}})
    with pytest.raises(PipelineError, match="calibrate_int8"):
        pipe(2, accelerator={"name": "int8", "convs": True})
    plain = pipe(3, seed=0)
    linear = pipe(3, seed=0, accelerator={"name": "int8"})
    assert 0 < (linear.images - plain.images).abs().max() < 0.05
    calibration = pipe.calibrate_int8(n=4, intervals=4)
    assert calibration == pipe.calibrate_int8(n=4, intervals=4)
    full = pipe(3, seed=0, accelerator={"name": "int8", "convs": True})
    assert 0 < (full.images - plain.images).abs().max() < 0.2
    assert torch.equal(pipe.reproduce(full.settings[1]), full.images[1])
    pipe.save_pretrained(tmp_path / "pipe")
    again = Pipeline.from_pretrained(tmp_path / "pipe")
    assert again.int8_calibration == calibration
    assert torch.equal(again(3, seed=0, accelerator={"name": "int8", "convs": True}).images, full.images)
    assert main(["sample", str(tmp_path / "pipe"), "--n", "2", "--accelerator", "int8", "--accelerator-option",
                 "convs=true", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    retrained = Pipeline(_unet(seed=5), processes.Flow(), "flow", sample_shape=(1, 8, 8), steps=6, num_classes=3)
    retrained.int8_calibration = calibration
    with pytest.raises(PipelineError, match="other weights"):
        retrained(2, accelerator={"name": "int8", "convs": True})
