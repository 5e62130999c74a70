"""A trained inpainting model: widened input channels, seeded masks, the recipe end to end."""

import pytest
import torch

from difflab import recipes
from difflab.models import UNet, UNetConfig
from difflab.pipeline import Pipeline
from difflab.training import config as train_config
from difflab.training.losses import inpainting_masks
from difflab.training.trainer import Trainer

SMALL = {"model_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (1,),
         "head_dim": 16, "norm_groups": 8, "num_classes": 10}


def test_a_widened_network_starts_as_the_original_whatever_the_new_inputs():
    torch.manual_seed(0)
    base = UNet(UNetConfig(in_channels=1, **SMALL)).eval()
    for p in base.parameters():
        p.data.normal_(0, 0.05)
    wide = UNet(UNetConfig(in_channels=1, concat_channels=2, **SMALL)).eval()
    assert wide.load_widened(base.state_dict()) == ["conv_in.weight"]
    x, t, labels = torch.randn(3, 1, 8, 8), torch.full((3,), 0.5), torch.tensor([1, 2, 3])
    extra = torch.randn(3, 2, 8, 8)
    torch.testing.assert_close(wide(x, t, labels, concat=extra), base(x, t, labels), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="extra input channels"):
        wide(x, t, labels)
    with pytest.raises(ValueError, match="takes no extra"):
        base(x, t, labels, concat=extra)
    other = UNet(UNetConfig(in_channels=1, **{**SMALL, "model_channels": 8, "norm_groups": 4}))
    with pytest.raises(ValueError, match="cannot be widened"):
        wide.load_widened(other.state_dict())


def test_masks_are_seeded_and_cover_what_they_say():
    seeds = torch.arange(200)
    a, b = inpainting_masks(seeds, (8, 8), 0.25), inpainting_masks(seeds, (8, 8), 0.25)
    assert torch.equal(a, b) and a.shape == (200, 1, 8, 8)
    full = (a.flatten(1).amin(1) == 1).float().mean()
    assert 0.1 < float(full) < 0.4 and bool((a.flatten(1).amax(1) == 1).all())
    assert torch.equal(inpainting_masks(seeds[:5], (8, 8), 1.0), torch.ones(5, 1, 8, 8))


def test_the_recipe_fine_tunes_a_pipeline_into_an_inpainting_pipeline(tmp_path):
    torch.manual_seed(0)
    base = UNet(UNetConfig(in_channels=1, **SMALL))
    from difflab import processes

    Pipeline(base, processes.Flow(), "flow", sample_shape=(1, 8, 8), num_classes=10,
             cond_dropout=0.1).save_pretrained(tmp_path / "base")
    model = {k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items() if k != "num_classes"}
    sets = [f"out_dir='{tmp_path / 'run'}'", f"train.init='{tmp_path / 'base'}'", "train.steps=4",
            "train.num_threads=1", "train.checkpoint_every=2", "data.batch_size=16", "sample.n=4", "sample.steps=2",
            *(f"model.{k}={v!r}".replace("'", '"') for k, v in model.items())]
    config = train_config.load(str(recipes.path("digits_inpaint")), sets)
    trainer = Trainer(config)
    assert trainer.initialised_from["widened"] == ["conv_in.weight"]
    trainer.run(progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "run" / "final")
    assert pipe.inpainting and pipe.network.config.concat_channels == 2
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    out = pipe.edit(images, mask=mask, class_labels=[3, 4], steps=3)
    keep = mask.expand_as(images) == 0
    assert torch.equal(out.images[keep], images[keep])
    assert torch.isfinite(pipe(2, steps=2).images).all()  # plain sampling: an all-repaint mask
    with pytest.raises(train_config.ConfigError, match="concat_channels"):
        Trainer(train_config.load(str(recipes.path("digits_inpaint")),
                                  [*sets, "model.concat_channels=0", f"out_dir='{tmp_path / 'bad'}'"]))
