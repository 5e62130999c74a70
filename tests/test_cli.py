"""The command line as a user meets it: one clear line per error, and no silent overwrite."""

import json

import pytest
import torch

from difflab.cli import main
from difflab.models import UNet, UNetConfig
from difflab.pipeline import Pipeline
from difflab.processes import Flow


@pytest.fixture
def pipe_dir(tmp_path):
    net = UNet(UNetConfig(in_channels=1, model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(),
                          norm_groups=4))
    Pipeline(net, Flow(), "flow", sample_shape=(1, 8, 8), steps=2).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_errors_are_one_line_without_a_traceback(tmp_path, capsys, pipe_dir):
    assert main(["sample", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is not a difflab pipeline" in err and "--debug" in err
    assert main(["sample", str(pipe_dir), "--sampler", "dpmpp_9m", "--out", str(tmp_path / "o2")]) == 1
    assert "unknown sampler 'dpmpp_9m'" in capsys.readouterr().err
    with pytest.raises(Exception, match="not a difflab pipeline"):  # --debug: the exception itself
        main(["sample", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o3"), "--debug"])


def test_sample_refuses_a_folder_with_results_unless_asked(tmp_path, capsys, pipe_dir):
    out = tmp_path / "out"
    assert main(["sample", str(pipe_dir), "--n", "3", "--out", str(out), "--no-progress"]) == 0
    assert main(["sample", str(pipe_dir), "--n", "2", "--out", str(out), "--no-progress"]) == 1
    assert "already holds files" in capsys.readouterr().err and (out / "00002.png").is_file()
    assert main(["sample", str(pipe_dir), "--n", "2", "--out", str(out), "--no-progress", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000.png", "00001.png"]  # no image of the first run


def test_export_and_train_refuse_to_replace_earlier_results(tmp_path, capsys):
    sets = ["--set", "model.hidden=16", "--set", "model.depth=1", "--set", "train.steps=2",
            "--set", "train.checkpoint_every=2", "--set", "train.num_threads=1", "--set", f"out_dir={tmp_path / 'run'}"]
    assert main(["train", "toy2d", "--no-progress", *sets]) == 0
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert main(["train", "toy2d", "--no-progress", *sets]) == 1
    assert "holds an earlier run" in capsys.readouterr().err
    assert main(["train", "toy2d", "--no-progress", *sets, "--overwrite"]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["loss"] == first["loss"]  # replaced, not appended
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "pipe")]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "pipe")]) == 1
    assert "already holds files" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "pipe"), "--overwrite"]) == 0
    assert torch.equal(Pipeline.from_pretrained(tmp_path / "pipe")(2).images,
                       Pipeline.from_pretrained(tmp_path / "run" / "final")(2).images)


def test_sample_with_loras_and_controls_from_files(tmp_path, capsys):
    from PIL import Image
    from tests.conftest import randomise

    from difflab.adapters import ControlNet, LoRA

    net = randomise(UNet(UNetConfig(in_channels=1, model_channels=8, channel_mult=(1,), num_res_blocks=1,
                                    attention_levels=(0,), head_dim=8, norm_groups=4)))
    pipe = Pipeline(net, Flow(), "flow", sample_shape=(1, 8, 8), steps=2)
    pipe.save_pretrained(tmp_path / "pipe")
    randomise(LoRA(net, rank=2), 1).save_pretrained(tmp_path / "lora", base_identity=pipe.identity())
    randomise(ControlNet(net, 1), 2).save_pretrained(tmp_path / "cn", base_identity=pipe.identity())
    Image.new("L", (8, 8), 255).save(tmp_path / "edges.png")
    args = ["sample", str(tmp_path / "pipe"), "--n", "2", "--no-progress", "--lora", str(tmp_path / "lora"),
            "--lora-scale", "0.5", "--control", str(tmp_path / "cn"), str(tmp_path / "edges.png")]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / "00001.json").read_text())["adapters"]
    assert record["loras"][0]["scale"] == 0.5 and record["controls"][0]["scale"] == 1.0
    assert main(["sample", str(tmp_path / "pipe"), "--n", "2", "--no-progress", "--out", str(tmp_path / "b")]) == 0
    assert "adapters" not in json.loads((tmp_path / "b" / "00001.json").read_text())
    LoRA(net, rank=2).save_pretrained(tmp_path / "other", base_identity="0123456789abcdef")
    capsys.readouterr()
    other = ["sample", str(tmp_path / "pipe"), "--lora", str(tmp_path / "other")]
    assert main([*other, "--out", str(tmp_path / "c")]) == 1
    assert "another model" in capsys.readouterr().err
    assert main([*other, "--other-base", "--no-progress", "--out", str(tmp_path / "d")]) == 0


def test_train_distils_progressively_from_a_teacher_run(tmp_path, capsys):
    sets = ["--set", "model.hidden=16", "--set", "model.depth=1", "--set", "train.steps=2",
            "--set", "train.num_threads=1", "--set", f"out_dir={tmp_path / 'teacher'}"]
    assert main(["train", "toy2d", "--no-progress", *sets]) == 0
    student = ["--set", "distill.method='progressive'", "--set", f"distill.teacher='{tmp_path / 'teacher' / 'final'}'",
               "--set", "distill.options={start_steps=4, end_steps=1}", "--set", "data.name='toy2d'",
               "--set", "train.steps=2", "--set", "train.num_threads=1", "--set", f"out_dir='{tmp_path / 'student'}'"]
    assert main(["train", "--no-progress", *student]) == 0
    assert f"wrote {tmp_path / 'student'}/final" in capsys.readouterr().out
    pipe = Pipeline.from_pretrained(tmp_path / "student" / "final")
    assert (pipe.sampler, pipe.steps, pipe.student["method"]) == ("ddim", 1, "progressive")
    assert main(["train", "--no-progress", *student]) == 1  # a second run would mix with the first
    assert "holds an earlier run" in capsys.readouterr().err
    assert main(["train", "--no-progress", *student, "--resume"]) == 0  # finished rounds are skipped


def test_sample_reports_wall_time_and_flops_per_image_and_call(tmp_path, capsys):
    net = UNet(UNetConfig(in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attention_levels=(1,), head_dim=8, norm_groups=4, num_classes=3))
    Pipeline(net, Flow(), "flow", sample_shape=(1, 8, 8), steps=6, num_classes=3,
             cond_dropout=0.1).save_pretrained(tmp_path / "pipe")
    reports = {}
    for name, extra in (("plain", []), ("cfg", ["--guidance", "cfg", "--guidance-scale", "2"]),
                        ("cached", ["--accelerator", "deep_cache", "--accelerator-option", "interval=3"])):
        out = tmp_path / name
        assert main(["sample", str(tmp_path / "pipe"), "--n", "2", "--class-label", "1", "--out", str(out),
                     "--no-progress", "--report", *extra]) == 0
        assert "GFLOP over 6 denoiser calls" in capsys.readouterr().out
        reports[name] = json.loads((out / "report.json").read_text())
    plain = reports["plain"]
    assert plain["images"] == 2 and plain["seconds"] > 0 and plain["denoiser_calls"] == 6
    assert plain["gflops_per_call"] * 6 == pytest.approx(plain["gflops_per_image"], rel=1e-3)
    assert reports["cfg"]["gflops_per_image"] == pytest.approx(2 * plain["gflops_per_image"], rel=1e-3)
    assert reports["cached"]["gflops_per_image"] < 0.9 * plain["gflops_per_image"]
