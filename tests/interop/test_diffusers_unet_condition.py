"""diffusers UNet2DConditionModel folders (Stable Diffusion 1.x / 2.x U-Nets) as difflab U-Nets with
text cross-attention: the same outputs (<= 1e-5 in float32) over the options that change the
computation, and a refusal by name for what difflab cannot express yet."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from tests.conftest import perturb

from difflab.interop import ConversionError, from_diffusers
from difflab.models import Network

SMALL = dict(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=24, layers_per_block=1,
             sample_size=8, in_channels=4, out_channels=4)
CONFIGS = {
    "SD 1.x style: conv projections, 4 heads everywhere": dict(
        SMALL, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4),
    "SD 2.x style: linear projections, heads per level, two layers per block": dict(
        SMALL, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=[2, 4],
        use_linear_projection=True, layers_per_block=2),
    "two transformer layers per block, upcast attention, freq shift, sin first": dict(
        SMALL, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, transformer_layers_per_block=2,
        upcast_attention=True, freq_shift=1, flip_sin_to_cos=False),
}


def _diffusers_model(tmp_path, **kw):
    torch.manual_seed(0)
    model = UNet2DConditionModel(**kw).eval()
    perturb(model)
    model.save_pretrained(tmp_path / "unet")
    return model, tmp_path / "unet"


@pytest.mark.parametrize("name", CONFIGS)
def test_a_converted_sd_unet_gives_diffusers_outputs(tmp_path, name):
    model, folder = _diffusers_model(tmp_path, **CONFIGS[name])
    net = from_diffusers(folder)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g)
    t = torch.tensor([3.0, 871.0])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, context=context),
                                   model(x, t, encoder_hidden_states=context).sample, rtol=0, atol=1e-5)
    net.save_pretrained(tmp_path / "difflab")  # a normal difflab network from here on
    again = Network.from_pretrained(tmp_path / "difflab")
    with torch.no_grad():
        assert torch.equal(again(x, t, context=context), net(x, t, context=context))


def test_an_sdxl_style_unet_with_added_embeddings_and_deeper_levels_gives_diffusers_outputs(tmp_path):
    cfg = dict(SMALL, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=[2, 4],
               transformer_layers_per_block=[1, 2], use_linear_projection=True, addition_embed_type="text_time",
               addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
    model, folder = _diffusers_model(tmp_path, **cfg)
    net = from_diffusers(folder)
    assert net.config.transformer_depth == (1, 2) and net.config.pooled_dim == 16
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g)
    pooled = torch.randn(2, 16, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48.0, 80, 8, 0, 64, 64]])  # sizes and crops
    t = torch.tensor([3.0, 871.0])
    with torch.no_grad():
        theirs = model(x, t, encoder_hidden_states=context,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        torch.testing.assert_close(net(x, t, context=context, pooled=pooled, time_ids=ids), theirs, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"pass time_ids of shape \(2, 6\)"):
        net(x, t, context=context, pooled=pooled)


def test_a_latent_consistency_unet_takes_the_guidance_scale_as_diffusers_lcm_pipeline_gives_it(tmp_path):
    """LCM's time_cond_proj_dim: diffusers' pipeline embeds w = scale - 1 and passes it as
    timestep_cond; difflab's U-Net takes guidance_scale and does the same inside."""
    from diffusers import LatentConsistencyModelPipeline

    cfg = dict(CONFIGS["SD 1.x style: conv projections, 4 heads everywhere"], time_cond_proj_dim=16)
    model, folder = _diffusers_model(tmp_path, **cfg)
    net = from_diffusers(folder)
    assert net.config.guidance_embedding and net.config.guidance_projection_dim == 16
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g)
    t, scale = torch.tensor([3.0, 871.0]), torch.tensor([8.5, 3.0])
    cond = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, scale - 1, embedding_dim=16)
    with torch.no_grad():
        theirs = model(x, t, encoder_hidden_states=context, timestep_cond=cond).sample
        mine = net(x, t, context=context, guidance_scale=scale)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
        assert not torch.allclose(mine, net(x, t, context=context, guidance_scale=torch.tensor([1.0, 1.0])), atol=1e-3)


@pytest.mark.parametrize("option, message", [
    ({"addition_embed_type": "text", "encoder_hid_dim": None}, "addition_embed_type='text' is not supported yet"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep' is not supported yet"),
])
def test_sdxl_and_other_variants_are_refused_by_name(tmp_path, option, message):
    cfg = dict(CONFIGS["SD 1.x style: conv projections, 4 heads everywhere"], **option)
    _, folder = _diffusers_model(tmp_path, **cfg)
    with pytest.raises(ConversionError, match=message):
        from_diffusers(folder)
