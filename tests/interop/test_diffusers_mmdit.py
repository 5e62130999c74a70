"""diffusers SD3Transformer2DModel folders as difflab MMDiTs: the same outputs (<= 1e-5 in float32)
for SD 3.0-style and SD 3.5-style (QK RMS-norm, dual attention) transformers, at the trained size and
others, and refusals by name."""

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from tests.conftest import perturb

from difflab.files import FileError
from difflab.interop import ConversionError, from_diffusers
from difflab.models import MMDiT, Network


def _diffusers_sd3(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 3, "attention_head_dim": 8,
           "num_attention_heads": 2, "joint_attention_dim": 12, "caption_projection_dim": 16,
           "pooled_projection_dim": 10, "out_channels": 4, "pos_embed_max_size": 12, **kw}
    model = SD3Transformer2DModel(**cfg).eval()
    perturb(model, 0.05)
    model.save_pretrained(tmp_path / "transformer")
    return model, tmp_path / "transformer"


@pytest.mark.parametrize("options", [{}, {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)},
                                     {"patch_size": 1, "out_channels": 8}])
def test_a_converted_sd3_transformer_gives_diffusers_outputs(tmp_path, options):
    model, folder = _diffusers_sd3(tmp_path, **options)
    net = from_diffusers(folder)
    assert isinstance(net, MMDiT)
    g = torch.Generator().manual_seed(1)
    context, pooled, t = torch.randn(2, 7, 12, generator=g), torch.randn(2, 10, generator=g), torch.tensor([3.0, 871.0])
    for size in ((8, 8), (6, 10)):  # the trained size, and another crop of the position table
        x = torch.randn(2, 4, *size, generator=g)
        with torch.no_grad():
            ours = net(x, t, context=context, pooled=pooled)
            theirs = model(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
        assert ours.abs().max() > 1e-2  # the perturbed weights reach the output
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    net.save_pretrained(tmp_path / "difflab")
    with torch.no_grad():
        again = Network.from_pretrained(tmp_path / "difflab")(x, t, context=context, pooled=pooled)
        assert torch.equal(again, net(x, t, context=context, pooled=pooled))


def test_a_context_mask_hides_text_tokens(tmp_path):
    _, folder = _diffusers_sd3(tmp_path)
    net = from_diffusers(folder)
    g = torch.Generator().manual_seed(2)
    x, pooled, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 10, generator=g), torch.tensor([500.0])
    context = torch.randn(1, 7, 12, generator=g)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    with torch.no_grad():
        masked = net(x, t, context=context, pooled=pooled, context_mask=mask)
        assert torch.allclose(masked, net(x, t, context=context[:, :4], pooled=pooled), atol=1e-5)
        assert torch.equal(net(x, t, context=context, pooled=pooled, context_mask=torch.ones_like(mask)),
                           net(x, t, context=context, pooled=pooled))


def test_unsupported_sd3_options_and_foreign_position_tables_are_refused(tmp_path):
    _, folder = _diffusers_sd3(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "qk_norm": "layer_norm"}))
    with pytest.raises(ConversionError, match="qk_norm='layer_norm' is not supported"):
        from_diffusers(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "pos_embed_max_size": None}))
    with pytest.raises(ConversionError, match="pos_embed_max_size"):
        from_diffusers(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "sample_size": 16}))  # another base: another table
    with pytest.raises(ConversionError, match="position table"):
        from_diffusers(folder)


def test_an_mmdit_is_zero_at_initialisation_and_too_large_images_are_refused():
    net = MMDiT.from_config({"in_channels": 4, "hidden_size": 16, "depth": 2, "num_heads": 2, "context_dim": 12,
                             "pooled_dim": 10, "position_grid": 4, "sincos_base": 4})
    x, context, pooled = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 12), torch.randn(1, 10)
    assert torch.equal(net(x, torch.tensor([1.0]), context=context, pooled=pooled), torch.zeros_like(x))
    with pytest.raises(ValueError, match="does not fit"):
        net(torch.randn(1, 4, 10, 10), torch.tensor([1.0]), context=context, pooled=pooled)
    with pytest.raises(ValueError, match="pass context"):
        net(x, torch.tensor([1.0]))


def test_a_sharded_folder_converts_like_one_file(tmp_path):
    model, folder = _diffusers_sd3(tmp_path)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    one, sharded = from_diffusers(folder), from_diffusers(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), sharded.state_dict().values(), strict=True))
    shard = sorted((tmp_path / "sharded").glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileError, match=f"{shard.name} does not exist"):
        from_diffusers(tmp_path / "sharded")
