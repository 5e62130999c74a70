"""difflab networks and pipelines written in the diffusers layout: diffusers loads them and gives
the same outputs (<= 1e-5 for networks, <= 1e-4 for images), difflab reads them back bit for bit,
and what diffusers cannot express is refused before anything is written."""

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMPipeline, DiTPipeline, DiTTransformer2DModel
from tests.conftest import randomise

import difflab
from difflab import processes
from difflab.interop import ConversionError, from_diffusers, scheduler_from_diffusers, to_diffusers
from difflab.models import VAE, DiT, DiTConfig, UNet, UNetConfig, VAEConfig
from difflab.pipeline import Pipeline

#: a DiT in diffusers' conventions (x-before-y positions, time features over half - 1, one base grid)
DIFFUSERS_DIT = {"sincos_order": "xy", "time_freq_shift": 1.0, "mlp_norm_eps": 1e-5}


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _vae(quant=True):
    return randomise(VAE(VAEConfig(in_channels=3, latent_channels=4, base_channels=16, channel_mult=(1, 2),
                                   num_res_blocks=1, norm_groups=8, scaling_factor=1.3, asymmetric_downsample=True,
                                   quant_conv=quant)), 4).eval()


def _dit(**kw):
    return randomise(DiT(DiTConfig(in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                                   num_classes=10, sincos_base=4, **{**DIFFUSERS_DIT, **kw})), 5).eval()


@pytest.mark.parametrize("quant", [True, False])
def test_an_exported_vae_runs_in_diffusers_and_comes_back_bit_for_bit(tmp_path, quant):
    vae = _vae(quant)
    to_diffusers(vae, tmp_path / "vae")
    theirs = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x).latent_dist.mean, vae.encode(x).mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs.decode(z).sample, vae.decode(z), rtol=0, atol=1e-5)
    assert theirs.config.scaling_factor == 1.3
    back = from_diffusers(tmp_path / "vae")
    assert back.config == vae.config and _same_weights(back.state_dict(), vae.state_dict())


def test_an_exported_dit_runs_in_diffusers_and_comes_back_bit_for_bit(tmp_path):
    dit = _dit()
    to_diffusers(dit, tmp_path / "dit")
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path / "dit").eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3.0, 871.0])
    with torch.no_grad():
        mine = dit(x, t, class_labels=torch.tensor([4, -1]))
        assert mine.abs().max() > 1e-2
        torch.testing.assert_close(theirs(x, timestep=t, class_labels=torch.tensor([4, 10])).sample, mine, rtol=0,
                                   atol=1e-5)
    back = from_diffusers(tmp_path / "dit")
    assert back.config.__dict__ == {**dit.config.__dict__, "out_channels": 4}  # None meant in_channels
    assert _same_weights(back.state_dict(), dit.state_dict())


def test_networks_diffusers_cannot_express_are_refused_before_anything_is_written(tmp_path):
    native = randomise(DiT(DiTConfig(in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)))
    with pytest.raises(ConversionError, match=r"sincos_order='yx' \(diffusers: 'xy'\); time_freq_shift=0.0"):
        to_diffusers(native, tmp_path / "dit")
    with pytest.raises(ConversionError, match="pad on every side"):
        to_diffusers(VAE(VAEConfig(base_channels=16, channel_mult=(1, 2), norm_groups=8)), tmp_path / "vae")
    with pytest.raises(ConversionError, match="not a MLP"):
        from difflab.models import MLP, MLPConfig

        to_diffusers(MLP(MLPConfig(dim=2)), tmp_path / "mlp")
    assert not any(tmp_path.iterdir())


def _ddim(scheduler_config, steps):
    """diffusers' DDIM on an exported scheduler, and its grid in difflab's time (index i at
    t = (i + 1) / N, alpha = 1 at t = 0)."""
    ddim = DDIMScheduler.from_config(scheduler_config, set_alpha_to_one=True)
    ddim.set_timesteps(steps)
    return ddim, torch.tensor([(int(t) + 1) / 1000 for t in ddim.timesteps] + [0.0], dtype=torch.float64)


def test_an_exported_pixel_pipeline_is_a_ddpm_pipeline_diffusers_samples_the_same(tmp_path):
    net = randomise(UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_levels=(1,), head_dim=8, norm_groups=8)), 3).eval()
    pipe = Pipeline(net, processes.DiscreteVP.cosine(), "v", sample_shape=(1, 8, 8), schedule="trailing")
    to_diffusers(pipe, tmp_path / "ddpm")
    theirs = DDPMPipeline.from_pretrained(tmp_path / "ddpm")
    assert theirs.scheduler.config.prediction_type == "v_prediction"
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ddim, grid = _ddim(theirs.scheduler.config, 5)
    expected = noise.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            expected = ddim.step(theirs.unet.eval()(expected, t).sample, t, expected, eta=0.0).prev_sample
        mine = difflab.sample(pipe.denoiser(), noise / float(pipe.process.sigma(grid[0])), "ddim", schedule=grid)
    torch.testing.assert_close(mine.float(), expected, rtol=0, atol=1e-4)
    back = from_diffusers(tmp_path / "ddpm")
    assert _same_weights(back.network.state_dict(), net.state_dict()) and back.schedule == "trailing"
    assert back.prediction.name == "v" and torch.equal(back.process.alphas_cumprod, pipe.process.alphas_cumprod)


def test_an_exported_latent_dit_pipeline_is_a_dit_pipeline_diffusers_samples_the_same(tmp_path):
    dit, vae = _dit(), _vae()
    pipe = Pipeline(dit, processes.DiscreteVP.scaled_linear(), "eps", sample_shape=(4, 8, 8), num_classes=10,
                    vae=vae, schedule="leading")
    to_diffusers(pipe, tmp_path / "dit")
    theirs = DiTPipeline.from_pretrained(tmp_path / "dit")
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config, set_alpha_to_one=True)
    steps, labels = 4, [3, 7]
    with torch.no_grad():
        expected = theirs(labels, guidance_scale=1.0, num_inference_steps=steps, output_type="pt",
                          generator=torch.Generator().manual_seed(5)).images
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    _, grid = _ddim(theirs.scheduler.config, steps)
    with torch.no_grad():
        latents = difflab.sample(pipe.denoiser(), noise / float(pipe.process.sigma(grid[0])), "ddim", schedule=grid,
                                 cond={"class_labels": torch.tensor(labels)})
        mine = (vae.decode(latents.float() / vae.config.scaling_factor) / 2 + 0.5).clamp(0, 1)
    assert expected.std() > 1e-3
    torch.testing.assert_close(mine, expected.float(), rtol=0, atol=1e-4)
    back = from_diffusers(tmp_path / "dit")
    assert back.num_classes == 10 and back.guidance == {"method": "cfg", "options": {"scale": 4.0}}
    assert _same_weights(back.network.state_dict(), dit.state_dict()) and back.vae.config == vae.config


def test_pipelines_diffusers_has_no_class_for_are_refused_before_anything_is_written(tmp_path):
    net = UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1,), num_res_blocks=1, norm_groups=8,
                          num_classes=3))
    with pytest.raises(ConversionError, match="this pipeline is a UNet with classes"):
        to_diffusers(Pipeline(net, processes.DiscreteVP.linear(), "eps", sample_shape=(1, 8, 8), num_classes=3),
                     tmp_path / "out")
    plain = UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1,), num_res_blocks=1, norm_groups=8))
    with pytest.raises(ConversionError, match="samples a discrete VP"):
        to_diffusers(Pipeline(plain, processes.Flow(), "flow", sample_shape=(1, 8, 8)), tmp_path / "out")
    with pytest.raises(ConversionError, match="square images"):
        to_diffusers(Pipeline(plain, processes.DiscreteVP.linear(), "eps", sample_shape=(1, 8, 16)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("process", [processes.DiscreteVP.scaled_linear(), processes.DiscreteVP.cosine(
    zero_terminal_snr=True), processes.DiscreteVP(torch.linspace(0.99, 0.01, 50)), processes.Flow(shift=3.0)])
def test_a_process_written_as_a_scheduler_reads_back_as_the_same_process(process):
    from difflab.interop import scheduler_to_diffusers

    prediction = "flow" if isinstance(process, processes.Flow) else "v"
    cfg = scheduler_to_diffusers(process, prediction)
    back = scheduler_from_diffusers(cfg)
    assert back.prediction.name == prediction and type(back.process) is type(process)
    t = torch.linspace(0.02, 1.0, 50, dtype=torch.float64)
    torch.testing.assert_close(back.process.sigma(t), process.sigma(t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(back.process.model_time(t), process.model_time(t), rtol=1e-12, atol=1e-9)
    with pytest.raises(ConversionError, match="has no diffusers scheduler"):
        scheduler_to_diffusers(processes.VE(), "eps")
