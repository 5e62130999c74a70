"""Pipeline.edit and `difflab edit`: every mode on pixel and latent pipelines, settings that remake it."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import randomise as _randomise

from difflab import processes
from difflab.cli import main
from difflab.models import VAE, UNet, UNetConfig, VAEConfig
from difflab.pipeline import Pipeline


@pytest.fixture
def pipe(digits_pipe):
    return digits_pipe


def _images(n=3, channels=1, size=8):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_each_mode_does_what_it_says(pipe):
    images = _images()
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 3:6, 3:6] = 1
    out = pipe.edit(images, mask=mask, class_labels=[1, 2, 3], feather=0.5)  # reaches 2 pixels out
    assert torch.equal(out.images[:, :, 0], images[:, :, 0])  # far from the feathered mask: unchanged
    assert not torch.equal(out.images[..., 4, 4], images[..., 4, 4])
    assert out.settings[0]["edit"]["mode"] == "inpaint" and out.settings[0]["edit"]["feather"] == 0.5
    exact = pipe.edit(images, inversion="bdia", class_labels=[1, 2, 3], guidance="cfg",
                      guidance_options={"scale": 3.0}, steps=10)
    assert float((exact.images - images).abs().max()) < 1e-4  # exact inversion of the guided model
    edited = pipe.edit(images, inversion="edict", source_class_labels=[1, 2, 3], class_labels=[4, 5, 6], steps=10)
    assert float((edited.images - images).abs().max()) > 1e-3
    assert edited.settings[1]["edit"]["batch_source_class_labels"] == [1, 2, 3]
    light = pipe.edit(images, strength=0.2, class_labels=1)
    heavy = pipe.edit(images, strength=1.0, class_labels=1)
    assert (light.images - images).abs().mean() < (heavy.images - images).abs().mean()
    assert light.settings[0]["edit"]["strength"] == 0.2


def test_latent_inpainting_keeps_the_kept_pixels_exactly():
    vae = _randomise(VAE(VAEConfig(in_channels=3, latent_channels=4, base_channels=16, channel_mult=(1, 2),
                                   num_res_blocks=1, norm_groups=8)), 1)
    net = _randomise(UNet(UNetConfig(in_channels=4, model_channels=16, channel_mult=(1,), num_res_blocks=1,
                                     attention_levels=(), head_dim=16, norm_groups=8, num_classes=3)))
    latent = Pipeline(net, processes.Flow(), "flow", sample_shape=(4, 4, 4), steps=4, num_classes=3, vae=vae,
                      cond_dropout=0.1)
    images = _images(2, 3)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1
    out = latent.edit(images, mask=mask, class_labels=0)
    keep = mask.expand_as(images) == 0
    assert torch.equal(out.images[keep], images[keep])
    with pytest.raises(ValueError, match="channels"):
        latent.edit(_images(2, 1), class_labels=0)
    with pytest.raises(ValueError, match="resize"):
        latent.edit(_images(2, 3, 16), class_labels=0)


def test_bad_edits_are_refused(pipe):
    images = _images()
    with pytest.raises(ValueError, match="not both"):
        pipe.edit(images, mask=torch.ones(1, 1, 8, 8) * (torch.arange(8) < 4), inversion="ddim", class_labels=1)
    with pytest.raises(ValueError, match="draws fresh noise"):
        pipe.edit(images, inversion="euler_ancestral", class_labels=1)
    with pytest.raises(ValueError, match="null-text"):
        pipe.edit(images, inversion="null_text", class_labels=1, guidance="none")
    with pytest.raises(ValueError, match="seeds"):
        pipe.edit(images, seeds=[1], class_labels=1)


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_the_command_line_edits_and_the_settings_remake_the_edit(tmp_path, pipe, capsys):
    pipe.save_pretrained(tmp_path / "pipe")
    rng = np.random.default_rng(0)
    files = [_png(tmp_path / f"in{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8)) for i in range(2)]
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, 4:] = 255
    mask_file = _png(tmp_path / "mask.png", mask)
    out = tmp_path / "edits"
    assert main(["edit", str(tmp_path / "pipe"), *files, "--mask", mask_file, "--class-label", "3", "--out", str(out),
                 "--no-progress"]) == 0
    made = np.asarray(Image.open(out / "00001.png"))
    original = np.asarray(Image.open(files[1]))
    assert (made[:, :4] == original[:, :4]).all() and not (made[:, 4:] == original[:, 4:]).all()
    settings = json.loads((out / "00001.json").read_text())
    assert settings["edit"]["mode"] == "inpaint" and settings["edit"]["masks"] == [str(tmp_path / "mask.png")]
    again = tmp_path / "again"
    assert main(["sample", str(tmp_path / "pipe"), "--settings", str(out / "00001.json"), "--out", str(again)]) == 0
    assert (again / "reproduced.png").read_bytes() == (out / "00001.png").read_bytes()
    assert main(["edit", str(tmp_path / "pipe"), files[0], "--invert", "ddim", "--class-label", "1",
                 "--source-class-label", "2", "--out", str(tmp_path / "inv")]) == 0
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(files[1])  # the source changed: refused
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "pipe"), "--settings", str(out / "00001.json"), "--out",
                 str(tmp_path / "third")]) == 1
    assert "has changed" in capsys.readouterr().err
    small = _png(tmp_path / "small.png", np.zeros((4, 4), dtype=np.uint8))
    assert main(["edit", str(tmp_path / "pipe"), files[0], "--mask", small, "--out", str(tmp_path / "x")]) == 1
    assert "mask is (4, 4) pixels" in capsys.readouterr().err


def test_prompt_to_prompt_from_a_text_pipeline_finds_the_words_tokens(tmp_path):
    from difflab.models import conditioning

    encoder = conditioning.get("minilm", max_tokens=12)
    assert encoder.positions("a small red circle at the top left", "red") == [3]
    assert encoder.positions("a small red circle at the top left", "top left") == [7, 8]
    with pytest.raises(ValueError, match="not a word"):
        encoder.positions("a small red circle", "blue")
    net = _randomise(UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1,), num_res_blocks=1,
                                     attention_levels=(0,), head_dim=16, norm_groups=8, context_dim=384)))
    text = Pipeline(net, processes.Flow(), "flow", sample_shape=(1, 8, 8), steps=4, cond_dropout=0.1,
                    text_encoder={"name": "minilm", "max_tokens": 12})
    sources = ["a small red circle at the top left", "a large green square at the bottom right"]
    targets = ["a small blue circle at the top left", "a large yellow square at the bottom right"]
    out = text.prompt_to_prompt(sources, targets, blend=["red", "blue", "green", "yellow"], reweight={"the": 2.0},
                                guidance="cfg", guidance_options={"scale": 3.0})
    assert out.images.shape == (2, 1, 8, 8) and out.settings[1]["edit"]["source_prompt"] == sources[1]
    assert torch.equal(text.reproduce(out.settings[1]), out.images[1])
    plain = text(prompts=targets, guidance="cfg", guidance_options={"scale": 3.0})
    assert not torch.allclose(out.images, plain.images)
    real = text.prompt_to_prompt(sources, targets, images=plain.images, guidance="none")
    assert real.settings[0]["edit"]["real_images"] and torch.isfinite(real.images).all()
    text.save_pretrained(tmp_path / "text")
    assert main(["edit", str(tmp_path / "text"), "--source-prompt", sources[0], "--prompt", targets[0], "--blend",
                 "red", "--blend", "blue", "--reweight", "the=1.5", "--out", str(tmp_path / "p2p")]) == 0
    assert json.loads((tmp_path / "p2p" / "00000.json").read_text())["edit"]["mode"] == "prompt_to_prompt"
    refined = text.prompt_to_prompt(["a red circle"], ["a small red circle"], guidance="none")  # a word added
    assert torch.isfinite(refined.images).all()
    with pytest.raises(ValueError, match="same token positions"):
        text.prompt_to_prompt(["a red circle", "a small red circle"], ["a blue circle", "a small blue circle"],
                              blend=["red"])
