"""diffusers UNet2DModel folders as difflab U-Nets: the same outputs (<= 1e-5 in float32) over the
options that change the computation, and a clear refusal for what cannot be expressed."""

import pytest
import torch
from diffusers import UNet2DModel
from tests.conftest import perturb, randomise

import difflab
from difflab.interop import ConversionError, from_diffusers
from difflab.models import Network

CONFIGS = {
    "additive time, one attention level": dict(
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8),
    "scale-shift, three levels, one resnet per level": dict(
        block_out_channels=(32, 64, 64), down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"), norm_num_groups=8, attention_head_dim=16,
        resnet_time_scale_shift="scale_shift", layers_per_block=1),
    "DDPM-style time embedding (sin first, freq shift 1), eps 1e-6": dict(
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
        flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
    "no attention": dict(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, in_channels=1, out_channels=1),
}


def _diffusers_model(tmp_path, **kw):
    torch.manual_seed(0)
    kw = {"in_channels": 3, "out_channels": 3, **kw}
    model = UNet2DModel(sample_size=16, **kw).eval()
    perturb(model)
    model.save_pretrained(tmp_path / "unet")
    return model, tmp_path / "unet"


@pytest.mark.parametrize("name", CONFIGS)
def test_a_converted_unet_gives_diffusers_outputs(tmp_path, name):
    model, folder = _diffusers_model(tmp_path, **CONFIGS[name])
    net = from_diffusers(folder)
    channels = CONFIGS[name].get("in_channels", 3)
    x = torch.randn(2, channels, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3.0, 871.0])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), model(x, t).sample, rtol=0, atol=1e-5)
    net.save_pretrained(tmp_path / "difflab")  # a normal difflab network from here on
    again = Network.from_pretrained(tmp_path / "difflab")
    with torch.no_grad():
        assert torch.equal(again(x, t), net(x, t))


def test_a_converted_unet_samples_with_difflab_samplers(tmp_path):
    from diffusers import DDPMScheduler

    _, folder = _diffusers_model(tmp_path, **CONFIGS["no attention"])
    DDPMScheduler().save_config(tmp_path / "scheduler")
    conv = from_diffusers(tmp_path / "scheduler")
    den = difflab.Denoiser(from_diffusers(folder), conv.process, conv.prediction)
    x0 = difflab.sample(den, torch.randn(2, 1, 16, 16), "dpmpp_2m", steps=4, schedule=conv.schedule)
    assert x0.shape == (2, 1, 16, 16) and torch.isfinite(x0).all()


def test_what_cannot_be_converted_is_refused_by_name(tmp_path):
    with pytest.raises(ConversionError, match="not a diffusers model folder"):
        from_diffusers(tmp_path)
    _, folder = _diffusers_model(tmp_path, block_out_channels=(16, 24), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    with pytest.raises(ConversionError, match=r"block_out_channels \[16, 24\] are not whole multiples"):
        from_diffusers(folder)
    _, folder = _diffusers_model(tmp_path, **CONFIGS["no attention"])
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"a \.bin is a pickle: pass allow_pickle=True"):
        from_diffusers(folder)
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"UNet2DModel"', '"UNet1DModel"'))
    with pytest.raises(ConversionError, match="holds a 'UNet1DModel'"):
        from_diffusers(folder)


EXPORTS = {
    "difflab's own: scale-shift time, middle attention norm, classes": dict(
        model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), head_dim=16, norm_groups=8,
        num_classes=10),
    "additive time, eps 1e-5, cos-first off, two attention levels": dict(
        model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 2), head_dim=8,
        norm_groups=8, time_mode="additive", norm_eps=1e-5, time_cos_first=False, time_freq_shift=1.0),
    "scale-shift without the middle attention norm, no attention levels": dict(
        model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), head_dim=16, norm_groups=8,
        mid_attention_norm=False, in_channels=2, out_channels=2),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_an_exported_unet_runs_in_diffusers_and_comes_back_bit_for_bit(tmp_path, name):


    from difflab.interop import to_diffusers
    from difflab.models import UNet, UNetConfig

    options = {"in_channels": 1, **EXPORTS[name]}
    net = randomise(UNet(UNetConfig(**options)), 3).eval()
    to_diffusers(net, tmp_path / "unet", sample_size=8)
    theirs = UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    x = torch.randn(2, options["in_channels"], 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.3, 0.9])
    labels = torch.tensor([4, 10]) if options.get("num_classes") else None  # 10: the null class
    with torch.no_grad():
        mine = net(x, t, class_labels=labels if labels is None else torch.tensor([4, -1]))
        torch.testing.assert_close(theirs(x, t, class_labels=labels).sample, mine, rtol=0, atol=1e-5)
    back = from_diffusers(tmp_path / "unet")
    def plain(config):  # out_channels None means in_channels
        return {**config.__dict__, "out_channels": config.out_channels or config.in_channels}

    assert plain(back.config) == plain(net.config)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), net.state_dict().values(), strict=True))


def test_what_diffusers_cannot_express_is_refused_before_anything_is_written(tmp_path):
    from difflab.interop import to_diffusers
    from difflab.models import UNet, UNetConfig

    text = UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1,), num_res_blocks=1,
                           attention_levels=(0,), head_dim=16, norm_groups=8, context_dim=8))
    with pytest.raises(ConversionError, match=r"context_dim .* needs UNet2DConditionModel"):
        to_diffusers(text, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="samples a discrete VP"):
        from difflab import processes
        from difflab.pipeline import Pipeline

        to_diffusers(Pipeline(text, processes.Flow(), "flow", sample_shape=(1, 8, 8)), tmp_path / "out")
