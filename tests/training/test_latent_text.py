import warnings

import pytest
import torch

from difflab.pipeline import Pipeline
from difflab.training import config as train_config
from difflab.training.trainer import Trainer

TINY = ["data.name='shapes'", "data.options={n=48, resolution=16, seed=0}", "data.batch_size=8",
        "text.encoder='minilm'", "text.max_tokens=12", "latent.train_steps=4", "latent.batch_size=8",
        "latent.model={base_channels=8, channel_mult=[1, 2], norm_groups=4, mid_attention=false}",
        "model.model_channels=16", "model.channel_mult=[1]", "model.num_res_blocks=1", "model.attention_levels=[0]",
        "model.head_dim=16", "model.norm_groups=8", "train.steps=3", "train.num_threads=1", "sample.steps=2",
        "sample.guidance='cfg'", "sample.guidance_options={scale=3.0}"]


def test_latent_text_to_image_training_end_to_end(tmp_path):
    cfg = train_config.load(None, [f"out_dir={tmp_path / 'run'}", *TINY])
    trainer = Trainer(cfg)
    assert trainer.x.shape == (48, 4, 8, 8)  # latents, encoded once
    assert trainer.text["context"].shape[1:] == (12, 384) and trainer.text["captions"][0].startswith("a ")
    assert trainer.model.config.context_dim == 384
    trainer.run(progress=False)
    assert (tmp_path / "run" / "vae" / "model.safetensors").is_file()
    pipe = Pipeline.from_pretrained(tmp_path / "run" / "final")
    assert pipe.vae is not None and pipe.text_encoder_config == {"name": "minilm", "max_tokens": 12}
    out = pipe(prompts=["a large blue square at the bottom right", "a small red circle at the top left"], seed=0)
    assert out.images.shape == (2, 3, 16, 16) and out.settings[1]["prompt"].startswith("a small red")
    again = Pipeline.from_pretrained(tmp_path / "run" / "final")(
        prompts=["a large blue square at the bottom right", "a small red circle at the top left"], seed=0)
    assert torch.equal(out.images, again.images)
    with pytest.warns(UserWarning, match="empty prompt"):
        pipe(prompts=[""], seed=0)
    with pytest.warns(UserWarning, match="only the first 12 are used"):
        pipe(prompts=["a small red circle at the top left of a very very very large and empty canvas"], seed=0)
    with pytest.raises(Exception, match="pass prompts"):
        pipe(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = Trainer(train_config.load(None, [f"out_dir={tmp_path / 'run'}", *TINY]))  # VAE loaded, not retrained
    assert torch.equal(resumed.x, trainer.x)


def test_text_encoder_pads_masks_and_caches():
    from difflab.models import conditioning

    enc = conditioning.get("minilm", max_tokens=12)
    out = enc(["a small red circle at the top left", ""])
    assert out["context"].shape == (2, 12, 384) and out["pooled"].shape == (2, 384)
    assert out["context_mask"][0].sum() == 10 and out["context_mask"][1].sum() == 2  # [CLS] ... [SEP]
    assert torch.all(out["context"][1, 2:] == 0)
    assert torch.equal(enc.null(1)["context"][0], out["context"][1])
    assert "" in enc._cache and len(enc._cache) >= 2
    red, blue = enc(["a red circle"])["pooled"], enc(["a blue circle"])["pooled"]
    assert 0.5 < float(torch.cosine_similarity(red, blue)) < 0.999
    with pytest.raises(ValueError, match="unknown text encoder 'no_such_encoder'"):
        conditioning.get("no_such_encoder")


def test_latent_export_from_another_directory_builds_no_dataset(tmp_path, monkeypatch):
    from difflab import data
    from difflab.training.export import export

    run = tmp_path / "work" / "run"
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # a relative out_dir, as `difflab train` is usually run
    cfg = train_config.load(None, ["out_dir=run", *TINY])
    Trainer(cfg).run(progress=False)
    prompts = ["a large blue square at the bottom right", "a small red circle at the top left"]
    own = Pipeline.from_pretrained(run / "final")(prompts=prompts, seed=3).images
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where no run/vae is: a cwd-relative VAE path would fail or mismatch

    def no_dataset(name, **options):
        raise AssertionError(f"export built the {name!r} dataset")

    monkeypatch.setattr(data, "build", no_dataset)
    exported = export(run)
    assert exported.vae is not None
    assert torch.equal(exported(prompts=prompts, seed=3).images, own)
    (run / "checkpoints" / "step_00000003" / "ema.safetensors").unlink()
    with pytest.raises(Exception, match=r"no ema\.safetensors"):
        export(run)
