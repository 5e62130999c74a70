"""Pickled checkpoints (a diffusers .bin, an original .ckpt, a LoRA .bin): refused by default with
a message naming the opt-in; with allow_pickle=True read by torch's restricted unpickler, giving the
same weights as safetensors; a pickle that carries code is refused and its code never runs."""

import os

import pytest
import torch
from diffusers import UNet2DModel
from tests.conftest import perturb

from difflab.files import FileError
from difflab.interop import ConversionError, from_diffusers, from_single_file, lora_from_file


def _unet(tmp_path):
    torch.manual_seed(0)
    model = perturb(UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                attention_head_dim=8).eval())
    model.save_pretrained(tmp_path / "safe")
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "diffusion_pytorch_model.bin").is_file()
    return model


class Payload:
    """A pickle that runs code when unpickled (what a hostile checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickled_diffusers_folder_is_refused_unless_the_user_opts_in(tmp_path):
    _unet(tmp_path)
    with pytest.raises(ConversionError, match="pass allow_pickle=True"):
        from_diffusers(tmp_path / "pickled")
    safe, pickled = from_diffusers(tmp_path / "safe"), from_diffusers(tmp_path / "pickled", allow_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(safe.state_dict().values(), pickled.state_dict().values(),
                                                 strict=True))


def test_a_pickle_that_carries_code_is_refused_and_the_code_never_runs(tmp_path):
    _unet(tmp_path)
    marker = tmp_path / "the-payload-ran"
    torch.save({"conv_in.weight": Payload(str(marker))}, tmp_path / "pickled" / "diffusion_pytorch_model.bin")
    with pytest.raises(FileError, match="not a pickle of plain tensors"):
        from_diffusers(tmp_path / "pickled", allow_pickle=True)
    torch.save({"state_dict": {"model.diffusion_model.x": Payload(str(marker))}}, tmp_path / "model.ckpt")
    with pytest.raises(FileError, match="not a pickle of plain tensors"):
        from_single_file(tmp_path / "model.ckpt", allow_pickle=True)
    assert not marker.exists()


def test_an_original_ckpt_and_a_lora_bin_load_with_the_opt_in(tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from tests.interop.test_single_file import SD1, _original, _random

    from difflab.adapters import LoRAError
    from difflab.interop.single_file import UNET_PREFIX, ldm_unet_key_map

    state = _original(tmp_path, "unet", _random(UNet2DConditionModel(**SD1)), ldm_unet_key_map, UNET_PREFIX,
                      ("proj_in", "proj_out"))
    save_file(state, tmp_path / "model.safetensors")
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "model.ckpt")  # latent diffusion's layout
    with pytest.raises(ConversionError, match="allow_pickle=True"):
        from_single_file(tmp_path / "model.ckpt")
    safe, pickled = from_single_file(tmp_path / "model.safetensors"), from_single_file(tmp_path / "model.ckpt",
                                                                                         allow_pickle=True)
    assert pickled.family == safe.family == "sd1"
    assert all(torch.equal(a, b) for a, b in zip(safe.unet.state_dict().values(), pickled.unet.state_dict().values(),
                                                 strict=True))
    _unet(tmp_path)
    net = from_diffusers(tmp_path / "safe")
    lora = {"unet.down_blocks.1.attentions.0.to_q.lora_A.weight": torch.randn(2, 32),
            "unet.down_blocks.1.attentions.0.to_q.lora_B.weight": torch.randn(32, 2)}
    torch.save(lora, tmp_path / "lora.bin")
    with pytest.raises(LoRAError, match="allow_pickle=True"):
        lora_from_file(tmp_path / "lora.bin", net)
    loaded = lora_from_file(tmp_path / "lora.bin", net, allow_pickle=True)
    assert loaded.rank == 2 and len(loaded.layers) == 1
