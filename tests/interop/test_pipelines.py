"""diffusers pipeline folders (model_index.json) as difflab pipelines: DDIM through the converted
pipeline lands where diffusers' own DDIM loop lands, every difflab sampler and `difflab serve` run on
it, and pipelines difflab cannot convert yet are refused by naming the part."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

import difflab
from difflab.pipeline import Pipeline, PipelineError


def _ddpm_folder(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D",
                                                                                             "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, layers_per_block=1).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing="leading")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "ddpm")
    return unet, scheduler, tmp_path / "ddpm"


def test_ddim_through_a_converted_diffusers_pipeline_lands_where_diffusers_does(tmp_path):
    unet, scheduler, folder = _ddpm_folder(tmp_path)
    pipe = Pipeline.from_pretrained(folder)  # a diffusers folder opens like a difflab one
    assert pipe.sample_shape == (1, 8, 8) and pipe.schedule == "leading"
    steps = 5
    ddim = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=True)
    ddim.set_timesteps(steps)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x_T.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    # the same grid in difflab's time: index i is t = (i + 1) / N, and alpha = 1 at t = 0
    grid = torch.tensor([(int(t) + 1) / 1000 for t in ddim.timesteps] + [0.0], dtype=torch.float64)
    den = pipe.denoiser()
    start = x_T / float(pipe.process.sigma(grid[0]))  # difflab starts at sigma(t_0) * noise; diffusers at noise
    mine = difflab.sample(den, start, "ddim", schedule=grid)
    torch.testing.assert_close(mine.float(), x, rtol=0, atol=2e-5)  # measured 2.9e-6 (float32 rounding)
    for sampler in ("dpmpp_2m", "unipc", "heun"):
        assert torch.isfinite(pipe(2, sampler=sampler, steps=4).images).all()
    pipe.save_pretrained(tmp_path / "difflab")  # from here on a normal difflab pipeline
    assert Pipeline.from_pretrained(tmp_path / "difflab").identity() == pipe.identity()


def test_serve_opens_a_diffusers_folder(tmp_path):
    from difflab.serve import generate, load_served, parse_request

    _, _, folder = _ddpm_folder(tmp_path)
    served = load_served([folder])
    assert served["ddpm"].conditioning == "none"
    run = generate(served["ddpm"], parse_request({"n": 2, "steps": 3}, served), tmp_path / "out")
    assert run.status == "finished" and run.images.shape == (2, 1, 8, 8) and run.nfe == 3


def test_pipelines_difflab_cannot_convert_yet_are_refused_by_part(tmp_path):
    import json

    _, _, folder = _ddpm_folder(tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"],
                                                          "text_encoder": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(PipelineError, match="with text_encoder, vae; difflab converts unconditional UNet2DModel"):
        Pipeline.from_pretrained(folder)
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "scheduler"}))
    with pytest.raises(PipelineError, match="names no scheduler"):
        Pipeline.from_pretrained(folder)
