"""diffusers DiTTransformer2DModel folders as difflab DiTs: the same outputs (<= 1e-5 in float32)
for class-conditional and learned-sigma models, and refusals by name."""

import pytest
import torch
from diffusers import DiTTransformer2DModel
from tests.conftest import perturb

from difflab.interop import ConversionError, from_diffusers
from difflab.models import Network


def _diffusers_dit(tmp_path, share=True, **kw):
    torch.manual_seed(0)
    cfg = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "num_layers": 2, "sample_size": 8,
           "patch_size": 2, "num_embeds_ada_norm": 10, **kw}
    model = DiTTransformer2DModel(**cfg).eval()
    perturb(model)
    if share:  # one time and class embedding, as in every converted DiT checkpoint
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    model.save_pretrained(tmp_path / "dit")
    return model, tmp_path / "dit"


@pytest.mark.parametrize("options", [{}, {"out_channels": 8}, {"norm_eps": 1e-6, "patch_size": 4}])
def test_a_converted_dit_gives_diffusers_outputs(tmp_path, options):
    model, folder = _diffusers_dit(tmp_path, **options)
    net = from_diffusers(folder)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, labels = torch.tensor([3.0, 871.0]), torch.tensor([4, 10])  # 10: the null class (class dropout)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, class_labels=torch.tensor([4, -1])),
                                   model(x, timestep=t, class_labels=labels).sample, rtol=0, atol=1e-5)
    net.save_pretrained(tmp_path / "difflab")
    with torch.no_grad():
        assert torch.equal(Network.from_pretrained(tmp_path / "difflab")(x, t, class_labels=labels), net(x, t, labels))


def test_per_block_embeddings_that_differ_are_refused(tmp_path):
    _, folder = _diffusers_dit(tmp_path, share=False)
    with pytest.raises(ConversionError, match="differs from block 0's"):
        from_diffusers(folder)


@pytest.mark.parametrize("options", [{}, {"out_channels": 8, "interpolation_scale": 2}])
def test_a_converted_pixart_transformer_gives_diffusers_outputs(tmp_path, options):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                     sample_size=8, patch_size=2, caption_channels=24, cross_attention_dim=16,
                                     **options).eval()
    perturb(model)
    model.save_pretrained(tmp_path / "pixart")
    net = from_diffusers(tmp_path / "pixart")
    g = torch.Generator().manual_seed(1)
    x, captions = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # the second caption is two tokens shorter
    t = torch.tensor([3.0, 871.0])
    with torch.no_grad():
        theirs = model(x, encoder_hidden_states=captions, timestep=t, encoder_attention_mask=mask.long(),
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        torch.testing.assert_close(net(x, t, context=captions, context_mask=mask), theirs, rtol=0, atol=1e-5)


def test_pixart_1024_size_embeddings_are_refused_by_name(tmp_path):
    from diffusers import PixArtTransformer2DModel

    PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=128,
                             caption_channels=24, cross_attention_dim=16).save_pretrained(tmp_path / "pixart")
    with pytest.raises(ConversionError, match="use_additional_conditions"):
        from_diffusers(tmp_path / "pixart")
