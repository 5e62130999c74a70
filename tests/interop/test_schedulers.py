"""diffusers scheduler configs as difflab processes and predictions, checked against diffusers
itself: the same alphas_cumprod / sigmas, the same network time input, the same x0 estimates."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

import difflab
from difflab.interop import scheduler_from_diffusers
from difflab.interop.schedulers import ConversionError

VP_CASES = [(schedule, zero_snr, prediction) for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2")
            for zero_snr in (False, True) for prediction in ("epsilon", "v_prediction", "sample")
            if not (zero_snr and prediction == "epsilon")]


@pytest.mark.parametrize(("schedule", "zero_snr", "prediction"), VP_CASES)
def test_discrete_vp_schedulers_convert_exactly(tmp_path, schedule, zero_snr, prediction):
    kw = {"beta_start": 0.00085, "beta_end": 0.012} if schedule == "scaled_linear" else {}
    sched = DDPMScheduler(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr, prediction_type=prediction,
                          clip_sample=False, **kw)
    sched.save_config(tmp_path)
    conv = scheduler_from_diffusers(tmp_path)
    torch.testing.assert_close(conv.process.alphas_cumprod.float(), sched.alphas_cumprod, rtol=2e-6, atol=1e-7)
    assert conv.prediction.name == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[prediction]
    assert "clip_sample" in conv.ignored
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    fed = []
    den = difflab.Denoiser.from_fn(lambda x_, time: fed.append(float(time[0])) or out, conv.process, conv.prediction)
    for index in (0, 17, 500, 999):
        fed.clear()
        mine = den(x, torch.full((2,), (index + 1) / 1000, dtype=torch.float64))
        theirs = sched.step(out, index, x).pred_original_sample
        assert fed[0] == pytest.approx(index, abs=1e-6)  # the network sees diffusers' timestep index
        if zero_snr and index == 999 and prediction == "v_prediction":
            assert torch.isfinite(mine).all()
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_converts_sigmas_timesteps_and_x0(tmp_path, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.save_config(tmp_path)
    conv = scheduler_from_diffusers(tmp_path)
    assert conv.prediction.name == "flow" and conv.process.name == "flow"
    sched.set_timesteps(10)
    # diffusers' grid before its shift runs from 1 to its sigma_min, which is already shifted
    unshifted = torch.linspace(1.0, sched.sigma_min, 10, dtype=torch.float64)
    torch.testing.assert_close(conv.process.sigma(unshifted).float(), sched.sigmas[:-1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(conv.process.model_time(unshifted).float(), sched.timesteps, rtol=1e-6, atol=1e-4)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    den = difflab.Denoiser.from_fn(lambda x_, time: v, conv.process, conv.prediction)
    t = unshifted[3]
    expected = x - sched.sigmas[3] * v  # diffusers' flow x0: sample - sigma * velocity
    torch.testing.assert_close(den(x, t.expand(2)), expected, rtol=1e-5, atol=1e-5)


def test_dynamic_shifting_needs_the_image_size_and_matches_flux(tmp_path):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sched.save_config(tmp_path)
    with pytest.raises(ConversionError, match="pass image_seq_len"):
        scheduler_from_diffusers(tmp_path)
    seq = 1024
    conv = scheduler_from_diffusers(tmp_path, image_seq_len=seq)
    mu = 0.5 + (1.15 - 0.5) * (seq - 256) / (4096 - 256)
    sched.set_timesteps(8, mu=mu)
    unshifted = torch.linspace(1.0, 1.0 / 1000, 8, dtype=torch.float64)  # dynamic shifting starts unshifted
    torch.testing.assert_close(conv.process.sigma(unshifted).float(), sched.sigmas[:-1], rtol=1e-6, atol=1e-6)
    assert conv.process.shift == pytest.approx(math.exp(mu))


def test_sampling_defaults_and_refusals(tmp_path):
    conv = scheduler_from_diffusers(dict(EulerDiscreteScheduler(timestep_spacing="trailing",
                                                                use_karras_sigmas=False).config))
    assert conv.schedule == "trailing"
    conv = scheduler_from_diffusers(dict(DDIMScheduler(timestep_spacing="leading", steps_offset=1).config))
    assert (conv.schedule, conv.schedule_options) == ("leading", {"offset": 1})
    assert scheduler_from_diffusers(dict(EulerDiscreteScheduler(use_karras_sigmas=True).config)).schedule == "karras"
    with pytest.raises(ConversionError, match="thresholding"):
        scheduler_from_diffusers(dict(DDPMScheduler(thresholding=True).config))
    with pytest.raises(ConversionError, match="prediction_type 'mystery'"):
        scheduler_from_diffusers({"_class_name": "DDPMScheduler", "prediction_type": "mystery"})
    (tmp_path / "scheduler_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        scheduler_from_diffusers(tmp_path)
