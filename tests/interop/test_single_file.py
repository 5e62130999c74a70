"""Original single-file Stable Diffusion checkpoints (latent-diffusion key naming): the family and
the config read from the weights, the same outputs as the diffusers models they were made from, and
refusals by name. The original-format state dicts are built here and checked to be genuine by
diffusers' own single-file converter, which must turn them back into the diffusers weights."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from tests.conftest import perturb

from difflab.interop import ConversionError, from_diffusers, from_single_file
from difflab.interop.single_file import UNET_PREFIX, VAE_PREFIX, ldm_unet_key_map, ldm_vae_key_map

SD1 = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, cross_attention_dim=24,
           layers_per_block=1, sample_size=8)
SD2 = dict(block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=[1, 2],
           use_linear_projection=True, cross_attention_dim=32, layers_per_block=2, sample_size=8)


def _random(model):
    torch.manual_seed(0)
    perturb(model)
    return model.eval()


def _original(tmp_path, kind, model, key_map, prefix, conv_keys):
    """The model in latent diffusion's naming, through difflab's (checked) conversion of its diffusers folder."""
    model.save_pretrained(tmp_path / kind)
    net = from_diffusers(tmp_path / kind)
    inverse = {v: k for k, v in key_map(net.config).items()}
    state = {}
    for name, value in net.state_dict().items():
        value = value.contiguous()
        if any(part in inverse[name] for part in conv_keys) and value.ndim == 2:  # 1x1 convolutions there
            value = value[:, :, None, None]
        state[prefix + inverse[name]] = value
    return state


@pytest.mark.parametrize("style, family", [(SD1, "sd1"), (SD2, "sd2")])
def test_an_original_sd_unet_is_read_from_its_weights_and_gives_diffusers_outputs(tmp_path, style, family):
    model = _random(UNet2DConditionModel(**style))
    conv = ("proj_in", "proj_out") if not style.get("use_linear_projection") else ()
    state = _original(tmp_path, "unet", model, ldm_unet_key_map, UNET_PREFIX, conv)
    theirs = convert_ldm_unet_checkpoint(state, dict(model.config))  # the names are latent diffusion's
    assert set(theirs) == set(model.state_dict())
    assert all(torch.equal(theirs[k].reshape(v.shape), v) for k, v in model.state_dict().items())
    loaded = from_single_file(state)
    assert loaded.family == family and loaded.vae is None
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, style["cross_attention_dim"], generator=g)
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, t, context=context),
                                   model(x, t, encoder_hidden_states=context).sample, rtol=0, atol=1e-5)


def test_an_original_sd_file_gives_its_vae_and_lists_what_it_did_not_convert(tmp_path):
    from difflab.files import save_tensors

    unet = _random(UNet2DConditionModel(**SD1))
    vae = _random(AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2))
    state = {**_original(tmp_path, "unet", unet, ldm_unet_key_map, UNET_PREFIX, ("proj_in", "proj_out")),
             **_original(tmp_path, "vae", vae, ldm_vae_key_map, VAE_PREFIX, ("attn_1.q", "attn_1.k", "attn_1.v",
                                                                           "attn_1.proj_out")),
             "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(4)}
    theirs = convert_ldm_vae_checkpoint(state, dict(vae.config))
    assert set(theirs) == set(vae.state_dict())
    assert all(torch.equal(theirs[k].reshape(v.shape), v) for k, v in vae.state_dict().items())
    save_tensors(tmp_path / "sd.safetensors", state)
    loaded = from_single_file(tmp_path / "sd.safetensors")
    assert loaded.left == {"cond_stage_model.": 1} and loaded.vae.config.scaling_factor == 0.18215
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.vae.decode(z), vae.decode(z).sample, rtol=0, atol=1e-5)


def test_a_pickle_or_an_unknown_family_is_refused(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    with pytest.raises(ConversionError, match=r"is a pickle \(\.ckpt\)"):
        from_single_file(tmp_path / "model.ckpt")
    with pytest.raises(ConversionError, match="an unknown family"):
        from_single_file({"transformer.blocks.0.weight": torch.zeros(2)})
