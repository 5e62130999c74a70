"""diffusers pipeline folders (model_index.json) as difflab pipelines: DDIM through the converted
pipeline lands where diffusers' own DDIM loop lands, every difflab sampler and `difflab serve` run on
it, and pipelines difflab cannot convert yet are refused by naming the part."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from tests.conftest import perturb

import difflab
from difflab.interop import ConversionError, from_diffusers, open_pipeline
from difflab.pipeline import Pipeline, PipelineError


def _ddpm_folder(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D",
                                                                                             "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, layers_per_block=1).eval()
    perturb(unet)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing="leading")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "ddpm")
    return unet, scheduler, tmp_path / "ddpm"


def test_ddim_through_a_converted_diffusers_pipeline_lands_where_diffusers_does(tmp_path):
    unet, scheduler, folder = _ddpm_folder(tmp_path)
    pipe = from_diffusers(folder)
    with pytest.raises(PipelineError, match=r"is a diffusers pipeline folder: open it with difflab\.interop"):
        Pipeline.from_pretrained(folder)
    assert open_pipeline(folder).identity() == pipe.identity()  # either kind of folder
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
    (folder / "model_index.json").write_text(json.dumps({**index, "controlnet": ["diffusers", "ControlNetModel"]}))
    with pytest.raises(ConversionError, match="with controlnet; difflab converts unet, transformer"):
        from_diffusers(folder)
    flux = ["diffusers", "FluxTransformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps({**index, "transformer": flux}))
    with pytest.raises(ConversionError, match="must name one network"):
        from_diffusers(folder)
    unet_free = {k: v for k, v in index.items() if k != "unet"}
    (folder / "model_index.json").write_text(json.dumps({**unet_free, "transformer": flux}))
    with pytest.raises(ConversionError, match="transformer is a FluxTransformer2DModel; difflab converts SD3"):
        from_diffusers(folder)
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["transformers", "CLIPTextModel"],
                                                          "tokenizer": ["transformers", "CLIPTokenizer"]}))
    with pytest.raises(ConversionError, match="a text-conditional network needs its text encoders"):
        from_diffusers(folder)
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "scheduler"}))
    with pytest.raises(ConversionError, match="and a scheduler"):
        from_diffusers(folder)


def _clip_tokenizer(tmp_path):
    """A character-level CLIP tokenizer (vocabulary and merges written here; nothing from a hub) and
    its vocabulary."""
    import json

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    words = tmp_path / "words"
    words.mkdir(exist_ok=True)
    (words / "vocab.json").write_text(json.dumps(vocab))
    (words / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), model_max_length=16), vocab


def _tiny_sd_folder(tmp_path):
    """A Stable Diffusion pipeline folder made here: a tiny U-Net, VAE, CLIP text encoder and a
    character-level CLIP tokenizer (vocabulary and merges written by the test; nothing from a hub)."""

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab = _clip_tokenizer(tmp_path)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=24, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                norm_num_groups=8, cross_attention_dim=24, layers_per_block=1, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    perturb(unet)
    perturb(vae)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=True, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd")
    return pipe, tmp_path / "sd"


def test_a_stable_diffusion_folder_samples_as_diffusers_does(tmp_path):
    from difflab import guidance

    theirs, folder = _tiny_sd_folder(tmp_path)
    pipe = from_diffusers(folder)
    assert pipe.sample_shape == (4, 8, 8) and pipe.vae is not None and pipe.text_encoder_config["name"] == "clip"
    steps, scale, prompt = 4, 3.0, "a red cube"
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = theirs(prompt, num_inference_steps=steps, guidance_scale=scale, latents=noise.clone(),
                          output_type="pt").images  # in [0, 1]
    theirs.scheduler.set_timesteps(steps)
    grid = torch.tensor([(int(t) + 1) / 1000 for t in theirs.scheduler.timesteps] + [0.0], dtype=torch.float64)
    encoder = pipe.text_encoder()
    guided = guidance.guide(pipe.denoiser(), "cfg", scale=scale, uncond=encoder.null(1))
    start = noise / float(pipe.process.sigma(grid[0]))  # difflab starts at sigma(t_0) * noise; diffusers at noise
    with torch.no_grad():
        latents = difflab.sample(guided, start, "ddim", schedule=grid, cond=encoder([prompt]))
        mine = (pipe.vae.from_latent(latents.float()).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(mine, expected, rtol=0, atol=1e-4)  # measured 7e-7
    out = pipe(2, prompts=prompt, sampler="unipc", steps=4)  # every difflab sampler and guidance from here on
    assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.images).all()
    assert torch.isfinite(pipe(1, prompts=prompt, steps=3, guidance="apg").images).all()


def test_difflab_sample_and_serve_take_a_stable_diffusion_folder(tmp_path):
    from difflab.cli import main
    from difflab.serve import generate, load_served, parse_request

    _, folder = _tiny_sd_folder(tmp_path)
    assert main(["sample", str(folder), "--prompt", "a red cube", "--n", "2", "--steps", "3",
                 "--sampler", "dpmpp_2m", "--out", str(tmp_path / "samples")]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) >= 2
    served = load_served([folder])
    run = generate(served["sd"], parse_request({"prompt": "a blue ball", "steps": 3}, served), tmp_path / "out")
    assert run.status == "finished" and run.images.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_a_text_to_image_folder_takes_every_sampler_and_guidance_method(tmp_path, family):
    """CFG at scale 1 is the conditional model: for every sampler it must sample what no guidance
    samples; every other method must sample finite images of the right size; `difflab sample` runs."""
    from difflab import guidance, samplers
    from difflab.cli import main

    _, folder = (_tiny_sd_folder if family == "sd" else _tiny_sd3_folder)(tmp_path)
    assert main(["sample", str(folder), "--prompt", "a red cube", "--n", "2", "--steps", "3",
                 "--out", str(tmp_path / "samples"), "--no-progress"]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) >= 2
    pipe = from_diffusers(folder)
    kw = {"prompts": "a red cube", "steps": 2, "seed": 3}
    for name in samplers.available():
        plain = pipe(1, sampler=name, guidance="none", **kw).images
        unit = pipe(1, sampler=name, guidance="cfg", guidance_options={"scale": 1.0}, **kw).images
        torch.testing.assert_close(unit, plain, atol=1e-5, rtol=0, msg=name)
    weak = from_diffusers(folder).denoiser()
    for method in guidance.available():
        options = {"weak": weak} if method == "autoguidance" else {}
        out = pipe(1, sampler="dpmpp_2m", guidance=method, guidance_options={"scale": 2.0, **options}, **kw).images
        assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all(), method


def test_an_sdxl_folder_samples_as_diffusers_does(tmp_path):
    """SDXL: two CLIP text encoders side by side, the pooled projection and the six size numbers
    embedded beside it, zeros as the null condition; the same images as StableDiffusionXLPipeline."""

    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from difflab import guidance

    tokenizer, vocab = _clip_tokenizer(tmp_path)
    torch.manual_seed(0)
    common = {"vocab_size": len(vocab), "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    text = CLIPTextModel(CLIPTextConfig(hidden_size=16, **common)).eval()
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, projection_dim=12, **common)).eval()
    unet = perturb(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), norm_num_groups=8,
        layers_per_block=1, cross_attention_dim=40, attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2],
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=12 + 6 * 8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval())
    vae = perturb(AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2).eval())
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=True, timestep_spacing="leading")
    theirs = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                       tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)
    theirs.save_pretrained(tmp_path / "sdxl")
    pipe = from_diffusers(tmp_path / "sdxl")
    assert pipe.text_encoder_config["name"] == "sdxl_clip" and pipe.text_encoder_config["size"] == [16, 16]
    steps, scale, prompt = 4, 3.0, "a red cube"
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = theirs(prompt, num_inference_steps=steps, guidance_scale=scale, latents=noise.clone(),
                          output_type="pt").images
    theirs.scheduler.set_timesteps(steps)
    grid = torch.tensor([(int(t) + 1) / 1000 for t in theirs.scheduler.timesteps] + [0.0], dtype=torch.float64)
    encoder = pipe.text_encoder()
    guided = guidance.guide(pipe.denoiser(), "cfg", scale=scale, uncond=encoder.null(1))
    with torch.no_grad():
        latents = difflab.sample(guided, noise / float(pipe.process.sigma(grid[0])), "ddim", schedule=grid,
                                 cond=encoder([prompt]))
        mine = (pipe.vae.from_latent(latents.float()).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(mine, expected, rtol=0, atol=1e-4)
    assert torch.isfinite(pipe(2, prompts=prompt, steps=3).images).all()


def _tiny_sd3_folder(tmp_path, t5=True):
    """A Stable Diffusion 3 folder made here: a tiny MMDiT, a 16-channel-style VAE without quant
    convolutions, two projected CLIP encoders, a T5 encoder and a unigram T5 tokenizer (written by
    the test; nothing from a hub)."""

    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from tokenizers import Tokenizer, models
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    tokenizer, vocab = _clip_tokenizer(tmp_path)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz "]
    tokenizer_3 = T5TokenizerFast(tokenizer_object=Tokenizer(models.Unigram(pieces, unk_id=2)), extra_ids=0,
                                  model_max_length=256)
    torch.manual_seed(0)
    common = {"vocab_size": len(vocab), "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    text = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=8, **common)).eval()
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, projection_dim=8, **common)).eval()
    text_3 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=48, d_ff=32, d_kv=8, num_layers=2, num_heads=2,
                                     relative_attention_num_buckets=8)).eval() if t5 else None
    transformer = perturb(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,)).eval(), 0.05)
    vae = perturb(AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5,
                                shift_factor=0.1).eval())
    theirs = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                      vae=vae, text_encoder=text, tokenizer=tokenizer, text_encoder_2=text_2,
                                      tokenizer_2=tokenizer, text_encoder_3=text_3,
                                      tokenizer_3=tokenizer_3 if t5 else None)
    theirs.save_pretrained(tmp_path / "sd3")  # read back: a tokenizer made in memory differs from its saved files
    dropped = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    folder = tmp_path / "sd3"
    return StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, **dropped), folder


@pytest.mark.parametrize("t5", [True, False])
def test_an_sd3_folder_samples_as_diffusers_does(tmp_path, t5):
    """SD 3: an MMDiT on rectified flow with shift 3, two CLIPs side by side and T5 after them (or
    zeros in its place), the VAE's shift factor; the same images as StableDiffusion3Pipeline."""
    from difflab import guidance

    theirs, folder = _tiny_sd3_folder(tmp_path, t5)
    pipe = from_diffusers(folder)
    assert pipe.text_encoder_config["name"] == "sd3_text" and pipe.sample_shape == (4, 8, 8)
    assert pipe.guidance == {"method": "cfg", "options": {"scale": 7.0}}
    steps, scale, prompt = 4, 3.0, "a red cube"
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = theirs(prompt, num_inference_steps=steps, guidance_scale=scale, latents=noise.clone(),
                          output_type="pt").images
    sigmas = theirs.scheduler.sigmas.double()
    grid = sigmas / (3.0 - 2.0 * sigmas)  # difflab's time before the shift
    encoder = pipe.text_encoder()
    guided = guidance.guide(pipe.denoiser(), "cfg", scale=scale, uncond=encoder.null(1))
    with torch.no_grad():
        latents = difflab.sample(guided, noise / float(pipe.process.sigma(grid[0])), "euler", schedule=grid,
                                 cond=encoder([prompt]))
        mine = (pipe.vae.from_latent(latents.float()).clamp(-1, 1) + 1) / 2
    assert (expected - 0.5).abs().max() > 1e-2
    torch.testing.assert_close(mine, expected, rtol=0, atol=1e-4)


def test_a_learned_sigma_dit_pipeline_samples_its_mean_as_diffusers_does(tmp_path):
    """DiT-XL/2's layout: the DiT predicts eps and a variance (out_channels = 2 x in); difflab's
    pipeline keeps the mean rows of the output layer, the channels DiTPipeline samples with."""
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = perturb(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval())
    first = dit.transformer_blocks[0].norm1.emb.state_dict()
    for block in dit.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    vae = perturb(AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2).eval())
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    theirs = DiTPipeline(transformer=dit, vae=vae, scheduler=scheduler)
    theirs.save_pretrained(tmp_path / "dit")
    pipe = from_diffusers(tmp_path / "dit")
    assert pipe.num_classes == 10 and pipe.network.config.out_channels == 4
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([5.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(pipe.network(x, t, class_labels=torch.tensor([2, 9])),
                                   dit(x, timestep=t, class_labels=torch.tensor([2, 9])).sample[:, :4], rtol=0,
                                   atol=1e-5)
        expected = theirs([2, 9], guidance_scale=1.0, num_inference_steps=4, output_type="pt",
                          generator=torch.Generator().manual_seed(5)).images
    scheduler.set_timesteps(4)
    grid = torch.tensor([(int(s) + 1) / 1000 for s in scheduler.timesteps] + [0.0], dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        latents = difflab.sample(pipe.denoiser(), noise / float(pipe.process.sigma(grid[0])), "ddim", schedule=grid,
                                 cond={"class_labels": torch.tensor([2, 9])})
        mine = (pipe.vae.from_latent(latents.float()) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(mine, expected.float(), rtol=0, atol=1e-4)
