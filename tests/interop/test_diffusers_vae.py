"""diffusers AutoencoderKL folders (Stable Diffusion's VAE) as difflab VAEs: the same posterior
means and decodings (<= 1e-5 in float32), the latent scaling and shift carried over, and refusals
by name."""

import pytest
import torch
from diffusers import AutoencoderKL
from tests.conftest import perturb

from difflab.interop import ConversionError, from_diffusers
from difflab.models import Network

CONFIGS = {
    "SD-style: three levels, mid attention, scaling 0.18215": dict(
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4),
    "two resnets per level, no mid attention, SD3-style shift": dict(
        block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8, latent_channels=2,
        mid_block_add_attention=False, scaling_factor=1.5, shift_factor=0.1, in_channels=1, out_channels=1),
    "SD 3-style: no quant convolutions": dict(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4, use_quant_conv=False,
        use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
}


def _diffusers_vae(tmp_path, **kw):
    torch.manual_seed(0)
    levels = len(kw["block_out_channels"])
    model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                          up_block_types=("UpDecoderBlock2D",) * levels, **kw).eval()
    perturb(model)
    model.save_pretrained(tmp_path / "vae")
    return model, tmp_path / "vae"


@pytest.mark.parametrize("name", CONFIGS)
def test_a_converted_vae_encodes_and_decodes_as_diffusers_does(tmp_path, name):
    model, folder = _diffusers_vae(tmp_path, **CONFIGS[name])
    vae = from_diffusers(folder)
    channels = CONFIGS[name].get("in_channels", 3)
    x = torch.rand(2, channels, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        theirs = model.encode(x).latent_dist
        mine = vae.encode(x)
        torch.testing.assert_close(mine.mean, theirs.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(mine.logvar, theirs.logvar, rtol=0, atol=1e-5)
        z = theirs.mean
        torch.testing.assert_close(vae.decode(z), model.decode(z).sample, rtol=0, atol=1e-5)
        scale, shift = model.config.scaling_factor, model.config.shift_factor or 0.0
        torch.testing.assert_close(vae.to_latent(x), (z - shift) * scale, rtol=0, atol=1e-5)
    vae.save_pretrained(tmp_path / "difflab")
    again = Network.from_pretrained(tmp_path / "difflab")
    with torch.no_grad():
        assert torch.equal(again.decode(z), vae.decode(z))


def test_vae_variants_difflab_cannot_express_are_refused_by_name(tmp_path):
    _, folder = _diffusers_vae(tmp_path, **CONFIGS["SD-style: three levels, mid attention, scaling 0.18215"])
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"use_quant_conv": true', '"use_quant_conv": false'))
    with pytest.raises(ConversionError, match="only one of use_quant_conv"):
        from_diffusers(folder)
