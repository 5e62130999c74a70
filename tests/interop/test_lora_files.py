"""LoRA files of other libraries on a converted diffusers UNet2DModel: a PEFT adapter injected into
the diffusers model by diffusers itself gives the same outputs as the difflab U-Net with the file
loaded as a runtime LoRA; the same weights in kohya naming too; mismatches are listed."""

import pytest
import torch
from diffusers import UNet2DModel
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from tests.conftest import perturb

from difflab.adapters import LoRAError, applied
from difflab.interop import from_diffusers, lora_from_file


@pytest.fixture
def models(tmp_path):
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                        norm_num_groups=8, attention_head_dim=8).eval()
    perturb(model)
    model.save_pretrained(tmp_path / "unet")
    net = from_diffusers(tmp_path / "unet")
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500])
    with torch.no_grad():
        plain = model(x, t).sample
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=False), model)  # random A and B: a trained adapter
    with torch.no_grad():
        expected = model(x, t).sample
    return model, net, x, t, plain, expected


def test_a_peft_lora_file_gives_diffusers_outputs(models, tmp_path):
    model, net, x, t, plain, expected = models
    state = get_peft_model_state_dict(model)
    assert any(".lora_A." in k for k in state)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({f"unet.{k}": v.contiguous() for k, v in state.items()}, folder / "pytorch_lora_weights.safetensors")
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    lora = lora_from_file(folder, net)
    assert lora.rank == 4 and lora.scaling(lora.layers[0]) == 2.0 and len(lora.layers) == len(state) // 2
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), plain, atol=2e-5, rtol=1e-4)
        with applied(net, lora):
            out = net(x, t)
    assert float((expected - plain).abs().max()) > 1e-2  # the LoRA matters
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)

    # the same weights in kohya naming, alpha per layer
    kohya = {}
    for key, value in state.items():
        module = key.replace(".lora_A.weight", "").replace(".lora_B.weight", "")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if '.lora_A.' in key else 'up'}.weight"] = value.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    with torch.no_grad(), applied(net, lora_from_file(tmp_path / "kohya.safetensors", net)):
        torch.testing.assert_close(net(x, t), expected, atol=2e-5, rtol=1e-4)

    kohya["lora_unet_down_blocks_7_attentions_0_to_q.lora_down.weight"] = torch.zeros(4, 64)
    save_file(kohya, tmp_path / "bad.safetensors")
    with pytest.raises(LoRAError, match="down_blocks_7"):
        lora_from_file(tmp_path / "bad.safetensors", net)
    save_file({"something.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(LoRAError, match="neither diffusers/PEFT"):
        lora_from_file(tmp_path / "other.safetensors", net)
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(LoRAError, match="pickle"):
        lora_from_file(tmp_path / "x.bin", net)


def test_a_stable_diffusion_lora_file_gives_diffusers_outputs(tmp_path):
    """An SD 1.x-style U-Net (1x1-convolution projections) with a PEFT LoRA on its attention and
    projections: the file in kohya naming on the converted U-Net gives what diffusers gives."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = perturb(UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                         norm_num_groups=8, cross_attention_dim=24, layers_per_block=1,
                                         attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval())
    model.save_pretrained(tmp_path / "unet")
    net = from_diffusers(tmp_path / "unet")
    g = torch.Generator().manual_seed(1)
    x, context, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g), torch.tensor([10, 500])
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]),
                            model)
    with torch.no_grad():
        expected = model(x, t, encoder_hidden_states=context).sample
    state = get_peft_model_state_dict(model)
    assert any(v.ndim == 4 for v in state.values())  # the projections' LoRA is convolutional
    kohya = {}
    for key, value in state.items():
        name = "lora_unet_" + key.replace(".lora_A.weight", "").replace(".lora_B.weight", "").replace(".", "_")
        kohya[f"{name}.lora_{'down' if '.lora_A.' in key else 'up'}.weight"] = value.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 24)
    save_file(kohya, tmp_path / "sd_lora.safetensors")
    with pytest.warns(UserWarning, match="1 text-encoder modules were not loaded"):
        lora = lora_from_file(tmp_path / "sd_lora.safetensors", net)
    with torch.no_grad(), applied(net, lora):
        torch.testing.assert_close(net(x, t, context=context), expected, atol=2e-5, rtol=1e-4)
