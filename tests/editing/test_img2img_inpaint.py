"""img2img starts where its strength says; inpainting keeps the kept region exactly, for every sampler."""

import pytest
import torch

from difflab import analytic, editing, processes, samplers, schedules
from difflab.editing.img2img import start_grid


class AsImages(torch.nn.Module):
    """An analytic mixture denoiser on (N, 1, 4, 4) images."""

    def __init__(self, den):
        super().__init__()
        self.den, self.process = den, den.process

    def forward(self, x, t, **cond):
        return self.den(x.flatten(1), t, **cond).reshape(x.shape)


def _images(process=None, prediction="flow"):
    mix = analytic.GaussianMixture.low_rank(dim=16, num_components=4, rank=2)
    den = AsImages(mix.denoiser(process or processes.Flow(), prediction))
    return den, mix.sample(6, generator=torch.Generator().manual_seed(3)).float().reshape(6, 1, 4, 4)


@pytest.mark.parametrize("schedule", ["uniform", "karras", "trailing", "logsnr"])
def test_the_grid_starts_at_the_strengths_t(schedule):
    process = processes.DiscreteVP.scaled_linear()
    full = schedules.get(schedule, process, 20)
    for strength in (1.0, 0.5, 0.3):
        ts = start_grid(process, schedule, 20, strength)
        assert float(ts[0]) == pytest.approx(strength * float(full[0]), abs=1e-15)
        assert torch.equal(ts[1:], full[full < ts[0] - 1e-12])  # the schedule's own points below it
    assert len(start_grid(process, "uniform", 20, 0.5)) in (11, 12)


def test_full_strength_on_flow_is_plain_sampling_and_low_strength_stays_close():
    den, image = _images()
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    plain = samplers.sample(den, noise, "dpmpp_2m", 10)
    assert torch.equal(editing.img2img(den, image, 1.0, steps=10, noise=noise), plain)
    near = editing.img2img(den, image, 0.1, steps=10, noise=noise)
    far = editing.img2img(den, image, 0.9, steps=10, noise=noise)
    assert (near - image).abs().mean() < 0.5 * (far - image).abs().mean()
    _, nfe = editing.img2img(den, image, 0.5, sampler="ddim", steps=10, schedule="uniform", noise=noise,
                             return_nfe=True)
    assert nfe == 6  # t = 0.5, then the uniform grid's 5 points below it: 6 steps, the last onto t = 0


@pytest.mark.parametrize("sampler", samplers.available())
def test_inpainting_keeps_the_kept_region_bit_for_bit(sampler):
    den, image = _images(processes.DiscreteVP.scaled_linear(), "eps")
    mask = torch.zeros(6, 1, 4, 4)
    mask[..., 1:3, 1:4] = 1
    out = editing.inpaint(den, image, mask, sampler=sampler, steps=8, generator=torch.Generator().manual_seed(0))
    keep = mask.expand_as(image) == 0
    assert torch.equal(out[keep], image[keep])
    assert torch.isfinite(out).all() and not torch.equal(out[~keep], image[~keep])


def test_repaint_resampling_walks_each_stretch_again_and_still_keeps_pixels():
    den, image = _images()
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    out, nfe = editing.inpaint(den, image, mask, sampler="ddim", steps=6, schedule="uniform", resample=3, jump=2,
                               generator=torch.Generator().manual_seed(0), return_nfe=True)
    assert nfe == 2 * 3 + 2 * 3 + 2  # two stretches walked three times, the last (onto 0) once
    keep = mask.expand_as(image) == 0
    assert torch.equal(out[keep], image[keep])
    # the resampling changes what is painted
    plain = editing.inpaint(den, image, mask, sampler="ddim", steps=6, schedule="uniform",
                            generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out, plain)


def test_feathering_grows_the_mask_softly_and_keeps_far_pixels():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 12:20, 12:20] = 1
    soft = editing.feather(mask, 2.0)
    assert torch.equal(soft[mask == 1], mask[mask == 1])  # what the hard mask repaints stays repainted
    assert float(soft[..., 10, 16]) > 0 and float(soft[..., 10, 16]) < 1
    assert float(soft[..., 0:3, :].abs().max()) == 0.0
    den, image = _images()
    small = torch.zeros(1, 1, 4, 4)
    small[..., 0, 0] = 1
    out = editing.inpaint(den, image, editing.feather(small, 0.5), steps=4)
    assert torch.equal(out[..., 3, 3], image[..., 3, 3])


def test_bad_inputs_are_refused_with_a_clear_message():
    den, image = _images()
    with pytest.raises(editing.EditError, match="pixels but the image is"):
        editing.inpaint(den, image, torch.ones(1, 1, 5, 5))
    with pytest.raises(editing.EditError, match="empty"):
        editing.inpaint(den, image, torch.zeros(1, 1, 4, 4))
    with pytest.raises(editing.EditError, match="covers all"):
        editing.inpaint(den, image, torch.ones(1, 1, 4, 4))
    with pytest.raises(editing.EditError, match=r"\[0, 1\]"):
        editing.inpaint(den, image, torch.full((1, 1, 4, 4), 2.0))
    for strength in (0, 1.5, -0.1, True):
        with pytest.raises(editing.EditError, match="strength"):
            editing.img2img(den, image, strength)
    with pytest.raises(editing.EditError, match="channels"):
        editing.check_image(torch.zeros(2, 3, 8, 8), (1, 8, 8))
    with pytest.raises(editing.EditError, match="NaN"):
        editing.img2img(den, image * float("nan"), 0.5)
