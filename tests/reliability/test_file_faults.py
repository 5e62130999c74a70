"""Every kind of file difflab writes, damaged every way a crash or a disk can damage it: truncated,
empty, corrupt, from another model. Each is refused naming the file, or (a checkpoint on resume)
passed over for the last good one."""

import json
import shutil

import pytest
import torch

from difflab import models, recipes, schedules
from difflab.files import FileError, load_tensors, read_json
from difflab.models import Network
from difflab.pipeline import Pipeline, PipelineError
from difflab.processes import Flow
from difflab.training import config as train_config
from difflab.training.trainer import Trainer


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path):
    path.write_bytes(b"")


def corrupt(path):
    data = path.read_bytes()
    path.write_bytes(b"\xff" * 16 + data[16:])


DAMAGES = {"truncated": truncate, "empty": empty, "corrupt": corrupt}
EXPECTED = {"truncated": r"truncated|not valid JSON", "empty": "is empty", "corrupt": r"corrupt|not valid JSON"}


@pytest.fixture
def pipeline_dir(tmp_path):
    net = models.MLP(models.MLPConfig(dim=2, hidden=16, depth=1))
    Pipeline(net, Flow(), "flow", sample_shape=(2,), steps=2).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["network/model.safetensors", "network/config.json", "pipeline.json"])
def test_a_damaged_pipeline_file_is_named(pipeline_dir, name, damage):
    DAMAGES[damage](pipeline_dir / name)
    with pytest.raises((FileError, PipelineError), match=rf"{name.split('/')[-1]}.*({EXPECTED[damage]})|"
                                                          rf"({EXPECTED[damage]})"):
        Pipeline.from_pretrained(pipeline_dir)


def test_weights_of_another_model_and_wrong_config_types_are_named(pipeline_dir, tmp_path):
    other = models.MLP(models.MLPConfig(dim=2, hidden=32, depth=1))
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", pipeline_dir / "network" / "model.safetensors")
    with pytest.raises(ValueError, match=r"do not match the network's config: .*wrong shapes"):
        Pipeline.from_pretrained(pipeline_dir)
    config = read_json(tmp_path / "other" / "config.json")
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "hidden": "wide"}))
    with pytest.raises(FileError, match=r"config\.json: MLP config: hidden must be int, got 'wide'"):
        Network.from_pretrained(tmp_path / "other")


@pytest.mark.parametrize("kind", models.REGISTRY.available())
def test_every_network_config_field_is_type_checked(kind):
    import dataclasses
    import typing

    cls = models.REGISTRY.get(kind)
    hints = typing.get_type_hints(cls.config_class)
    for field in dataclasses.fields(cls.config_class):
        wrong = 5 if hints[field.name] is str else "abc"
        with pytest.raises(ValueError, match=rf"{field.name} must be"):
            cls.from_config({field.name: wrong})


SMALL = ["model.hidden=16", "model.depth=1", "data.batch_size=16", "data.options={kind='ring', n=128}",
         "train.num_threads=1", "train.tensorboard=false", "train.steps=6", "train.checkpoint_every=2",
         "train.keep_last=5"]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "trainer.json"])
def test_resume_passes_over_a_damaged_latest_checkpoint(tmp_path, name, damage):
    cfg = train_config.load(recipes.path("toy2d"), [*SMALL, f"out_dir={tmp_path}"])
    Trainer(cfg).run(progress=False)
    latest = tmp_path / "checkpoints" / "step_00000006"
    DAMAGES[damage](latest / name)
    shutil.rmtree(tmp_path / "final")
    trainer = Trainer(cfg)
    with pytest.warns(UserWarning, match=r"step_00000006 cannot be read"):
        assert trainer.resume() == 4  # the one before, loaded whole


def test_resume_with_every_checkpoint_damaged_says_so(tmp_path):
    cfg = train_config.load(recipes.path("toy2d"), [*SMALL, "train.steps=4", f"out_dir={tmp_path}"])
    Trainer(cfg).run(progress=False)
    for ckpt in (tmp_path / "checkpoints").glob("step_*"):
        truncate(ckpt / "model.safetensors")
    with pytest.warns(UserWarning), pytest.raises(FileError, match="no readable checkpoint"):
        Trainer(cfg).resume()


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_schedule_and_tensor_files_are_named(tmp_path, damage):
    proc = Flow()
    schedules.save(tmp_path / "grid.json", schedules.get("karras", proc, 4), proc)
    DAMAGES[damage](tmp_path / "grid.json")
    with pytest.raises(FileError, match=rf"grid\.json.*({EXPECTED[damage]})"):
        schedules.load(tmp_path / "grid.json", proc)
    from difflab.files import save_tensors

    save_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(64)})
    DAMAGES[damage](tmp_path / "t.safetensors")
    with pytest.raises(FileError, match=rf"t\.safetensors.*({EXPECTED[damage]})"):
        load_tensors(tmp_path / "t.safetensors")


def test_a_damaged_classifier_cache_is_rebuilt(tmp_path, monkeypatch):
    import dataclasses

    from difflab.metrics import classifiers

    quick = dataclasses.replace(classifiers.HELPERS["digits"], settings={"epochs": 1, "seed": 0})
    monkeypatch.setitem(classifiers.HELPERS, "digits", quick)
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    _, acc = classifiers.load_classifier("digits")
    truncate(next(tmp_path.glob("digits_classifier_*.safetensors")))
    with pytest.warns(UserWarning, match="is damaged"):
        _, again = classifiers.load_classifier("digits")
    assert again == acc  # trained again, the same (deterministic) result


@pytest.mark.parametrize(("key", "value"), [("steps", "abc"), ("steps", 0), ("sample_shape", [2, "x"]),
                                            ("sampler", 3), ("latent", "yes"), ("num_classes", 2.5),
                                            ("process", "flow"), ("sample_shape", [])])
def test_wrong_types_in_pipeline_json_are_named(pipeline_dir, key, value):
    config = read_json(pipeline_dir / "pipeline.json")
    (pipeline_dir / "pipeline.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(PipelineError, match=rf"pipeline\.json: {key} must be"):
        Pipeline.from_pretrained(pipeline_dir)
    (pipeline_dir / "pipeline.json").write_text(json.dumps({k: v for k, v in config.items() if k != "sampler"}))
    with pytest.raises(PipelineError, match="lacks 'sampler'"):
        Pipeline.from_pretrained(pipeline_dir)


def test_resume_drops_a_half_written_log_line_and_records_past_the_checkpoint(tmp_path):
    cfg = train_config.load(recipes.path("toy2d"), [*SMALL, "train.log_every=1", f"out_dir={tmp_path}"])
    Trainer(cfg).run(progress=False)
    log = tmp_path / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 7, "lo')  # killed in the middle of a write
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000006")
    shutil.rmtree(tmp_path / "final")
    Trainer(cfg).run(resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
