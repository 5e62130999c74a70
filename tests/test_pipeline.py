import json
import warnings

import pytest
import torch
from tests.conftest import randomise as _randomise

from difflab import processes
from difflab.cli import main
from difflab.models import VAE, DiT, DiTConfig, VAEConfig
from difflab.pipeline import Pipeline, PipelineError


def test_saved_and_loaded_pipeline_makes_bit_identical_images(tmp_path, digits_pipe):
    a = digits_pipe(12, seed=3, sampler="euler_ancestral", batch_size=5)  # stochastic sampler, uneven batches
    digits_pipe.save_pretrained(tmp_path / "pipe")
    loaded = Pipeline.from_pretrained(tmp_path / "pipe")
    b = loaded(12, seed=3, sampler="euler_ancestral", batch_size=5)
    assert torch.equal(a.images, b.images)
    assert a.settings == b.settings
    assert a.settings[7]["seed"] == 10 and a.settings[7]["class_label"] == 7
    assert a.settings[7]["batch_seeds"] == [8, 9, 10, 11, 12] and a.settings[7]["batch_index"] == 2
    c = loaded(seeds=[3, 4], sampler="euler_ancestral", class_labels=[3, 4])
    assert not torch.equal(c.images, a.images[:2])  # other labels, other images
    assert len(a.pil) == 12 and a.pil[0].size == (8, 8)


def test_an_images_json_reproduces_it_exactly_through_the_command_line(tmp_path, digits_pipe):
    digits_pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "samples"
    assert main(["sample", str(tmp_path / "pipe"), "--n", "6", "--steps", "5", "--sampler", "dpmpp_2m_sde",
                 "--seed", "10", "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    assert (out / "grid.png").is_file() and len(list(out.glob("0*.png"))) == 6
    settings = json.loads((out / "00005.json").read_text())
    assert settings["seed"] == 15 and settings["steps"] == 5 and settings["sampler"] == "dpmpp_2m_sde"
    again = tmp_path / "again"
    assert main(["sample", str(tmp_path / "pipe"), "--settings", str(out / "00005.json"), "--out", str(again)]) == 0
    assert (again / "reproduced.png").read_bytes() == (out / "00005.png").read_bytes()
    image = Pipeline.from_pretrained(tmp_path / "pipe").reproduce(settings)
    first = Pipeline.from_pretrained(tmp_path / "pipe")(seeds=settings["batch_seeds"], steps=5, sampler="dpmpp_2m_sde",
                                                          class_labels=settings["batch_class_labels"])
    assert torch.equal(image, first.images[settings["batch_index"]])


def test_latent_dit_pipeline_round_trip(tmp_path):
    vae = _randomise(VAE(VAEConfig(in_channels=3, latent_channels=4, base_channels=16, channel_mult=(1, 2),
                                   num_res_blocks=1, norm_groups=8)), 1)
    dit = _randomise(DiT(DiTConfig(in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)))
    pipe = Pipeline(dit, processes.DiscreteVP.scaled_linear(), "v", sample_shape=(4, 8, 8), steps=4, num_classes=3,
                    vae=vae, guidance={"method": "cfg", "options": {"scale": 3.0}}, cond_dropout=0.1)
    out = pipe(3, seed=1)
    assert out.images.shape == (3, 3, 16, 16) and out.settings[0]["guidance"] == "cfg"
    pipe.save_pretrained(tmp_path / "latent")
    again = Pipeline.from_pretrained(tmp_path / "latent")(3, seed=1)
    assert torch.equal(out.images, again.images)
    assert not torch.equal(pipe(3, seed=1, guidance="none").images, out.images)


def test_export_of_a_training_run(tmp_path):
    from difflab.training import config as train_config
    from difflab.training.export import export
    from difflab.training.trainer import Trainer

    cfg = train_config.load(None, [f"out_dir={tmp_path / 'run'}", "train.steps=3", "train.num_threads=1",
                                   "model.model_channels=16", "model.channel_mult=[1]", "model.num_res_blocks=1",
                                   "model.attention_levels=[]", "model.norm_groups=8", "data.batch_size=8",
                                   "sample.steps=3"])
    trainer = Trainer(cfg)
    trainer.run(progress=False)
    exported = export(tmp_path / "run")
    final = Pipeline.from_pretrained(tmp_path / "run" / "final")
    assert torch.equal(exported(4).images, final(4).images)
    assert torch.equal(trainer.generate(4), final(4).images)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "pipeline.json").is_file()


def test_eval_command_writes_json_and_table(tmp_path, digits_pipe):
    digits_pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "pipe"), "--metrics", "fd,pr", "--features", "pixels", "--n", "80",
                 "--steps", "3", "--reference", "digits:test", "--n-reference", "100", "--out", str(out),
                 "--no-progress"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["fd"]["n_real"] == 100 and result["fd"]["n_fake"] == 80 and result["fd"]["value"] > 0
    assert 0 <= result["pr"]["precision"] <= 1 and "kid" not in result
    assert "| dpmpp_2m | 3 | pixels |" in (out / "metrics.md").read_text()


def test_bad_input_is_refused_clearly(tmp_path, digits_pipe):
    with pytest.raises(PipelineError, match=r"no pipeline\.json"):
        Pipeline.from_pretrained(tmp_path)
    digits_pipe.network.save_pretrained(tmp_path / "bare")
    with pytest.raises(PipelineError, match="bare network"):
        Pipeline.from_pretrained(tmp_path / "bare")
    digits_pipe.save_pretrained(tmp_path / "pipe")
    cfg_path = tmp_path / "pipe" / "network" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "model_channels": 32}))
    with pytest.raises(ValueError, match="do not match the network's config"):
        Pipeline.from_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="unknown sampler"):
        digits_pipe(2, sampler="dpm++")
    with pytest.raises(PipelineError, match=r"in \[0, 10\)"):
        digits_pipe(2, class_labels=[3, 12])
    with pytest.raises(PipelineError, match="not text-conditional"):
        digits_pipe(2, prompts=["a red circle"])
    digits_pipe.cond_dropout = 0.0
    with pytest.raises(PipelineError, match="guidance='icg'"):
        digits_pipe(2, guidance="cfg", guidance_options={"scale": 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert digits_pipe(2, guidance="icg", guidance_options={"scale": 2.0}).images.shape == (2, 1, 8, 8)
