import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab import recipes
from difflab.training import config as train_config
from difflab.training.trainer import Trainer, TrainingError

TOY = recipes.path("toy2d")
SMALL = ["model.hidden=32", "model.depth=2", "data.batch_size=32", "data.options={kind='ring', n=512}",
         "train.num_threads=1", "train.log_every=10"]


def _cli(out, *sets, resume=False, wait=True):
    cmd = [sys.executable, "-m", "difflab", "train", str(TOY), "--no-progress", "--set", f"out_dir={out}"]
    for s in [*SMALL, *sets]:
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _tensors(ckpt: Path) -> dict:
    out = {}
    for name in ("model", "ema", "optimizer"):
        out.update({f"{name}.{k}": v for k, v in load_file(ckpt / f"{name}.safetensors").items()})
    return out


def assert_same_checkpoint(a_dir: Path, b_dir: Path) -> None:
    """Every model, EMA and optimizer tensor of two checkpoints equal bit for bit."""
    a, b = _tensors(a_dir), _tensors(b_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_killed_run_resumes_bit_identical(tmp_path):
    steps = ["train.steps=1500", "train.checkpoint_every=100"]
    ref = _cli(tmp_path / "ref", *steps)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = _cli(tmp_path / "cut", *steps, wait=False)
    target = tmp_path / "cut" / "checkpoints" / "step_00000300"
    deadline = time.time() + 300
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "cut" / "final").exists()
    resumed = _cli(tmp_path / "cut", *steps, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_checkpoint(tmp_path / "ref" / "checkpoints" / "step_00001500",
                           tmp_path / "cut" / "checkpoints" / "step_00001500")


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    steps = ["train.steps=40", "train.checkpoint_every=40"]
    single = _cli(tmp_path / "one", *steps)
    assert single.returncode == 0, single.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "difflab", "train", str(TOY), "--no-progress", "--set", f"out_dir={tmp_path / 'two'}"]
    for s in [*SMALL, *steps]:
        cmd += ["--set", s]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    a = load_file(tmp_path / "one" / "checkpoints" / "step_00000040" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "step_00000040" / "model.safetensors")
    for key in a:  # the same data, noise and gradients; only the reduction order differs
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def test_bad_config_and_mismatched_checkpoint_are_refused(tmp_path):
    with pytest.raises(train_config.ConfigError, match=r"unknown config key 'optim\.learning_rate'"):
        train_config.load(TOY, ["optim.learning_rate=1"])
    with pytest.raises(FileNotFoundError, match="no config file"):
        train_config.load(tmp_path / "missing.toml")
    cfg = train_config.load(TOY, [*SMALL, "train.steps=20", "train.checkpoint_every=10", f"out_dir={tmp_path}"])
    Trainer(cfg).run(progress=False)
    changed = train_config.load(TOY, [*SMALL, "train.steps=20", "optim.lr=0.5", f"out_dir={tmp_path}"])
    with pytest.raises(train_config.ConfigError, match=r"optim\.lr: checkpoint 0\.001 vs now 0\.5"):
        Trainer(changed).run(resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(train_config.load(None, ["data.name='folder'", f"data.options={{root='{tmp_path}/nope'}}"]))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = train_config.load(TOY, [*SMALL, "train.steps=30", "train.checkpoint_every=5", f"out_dir={tmp_path}"])
    trainer = Trainer(cfg)
    real_loss, calls = trainer._loss, []

    def poisoned(batch):  # a loss that turns NaN at step 12, as a diverging run would
        calls.append(1)
        loss = real_loss(batch)
        return loss * float("nan") if len(calls) == 13 else loss

    monkeypatch.setattr(trainer, "_loss", poisoned)
    with pytest.raises(TrainingError, match=r"nan at step 12.*Last good checkpoint: .*step_00000010"):
        trainer.run(progress=False)
    saved = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert saved[-1].name == "step_00000010" and not (tmp_path / "final").exists()
    assert all(torch.isfinite(v).all() for v in load_file(saved[-1] / "model.safetensors").values())
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10]


def test_metrics_go_to_json_lines_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = train_config.load(TOY, [f"out_dir={tmp_path}", *SMALL, "train.steps=20", "train.checkpoint_every=20"])
    Trainer(cfg).run(progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20]
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    losses = board.Scalars("train/loss")
    assert [e.step for e in losses] == [10, 20]
    assert losses[-1].value == pytest.approx(lines[-1]["loss"], rel=1e-6)


RESUME_RECIPES = {
    # the digits U-Net keeps its convolution weights channels-last: the layout that broke resume
    "unet_channels_last": ("digits", ["model.model_channels=16", "model.head_dim=16", "model.norm_groups=8"]),
    "dit": (None, ["data.name='digits'", "model={kind='dit', patch_size=2, hidden_size=32, depth=2, num_heads=2}"]),
    "mlp": ("toy2d", SMALL),
}


@pytest.mark.parametrize("kind", RESUME_RECIPES)
def test_resume_is_bit_identical_for_every_network_kind(tmp_path, kind):
    recipe, sets = RESUME_RECIPES[kind]
    common = [*sets, "data.batch_size=16", "train.steps=6", "train.checkpoint_every=3", "train.keep_last=5",
              "train.sample_every=0", "train.num_threads=1", "optim.warmup_steps=2", "ema.decay=0.9"]
    full = train_config.load(recipe, [*common, f"out_dir={tmp_path / 'full'}"])
    Trainer(full).run(progress=False)
    cut = train_config.load(recipe, [*common, f"out_dir={tmp_path / 'cut'}", "train.steps=6"])
    trainer = Trainer(cut)
    if kind == "unet_channels_last":
        conv = next(p for p in trainer.model.parameters() if p.ndim == 4 and p.shape[-1] > 1 and p.shape[1] > 1)
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    trainer.run(progress=False)
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000006")  # as if killed after step 3
    shutil.rmtree(tmp_path / "cut" / "final")
    Trainer(cut).run(resume=True, progress=False)
    assert_same_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000006",
                           tmp_path / "cut" / "checkpoints" / "step_00000006")


@pytest.mark.parametrize("hidden", [16, 48])  # a smaller model's state crashed the fused step; a larger one stuck
def test_optimizer_state_from_another_model_is_refused(tmp_path, hidden):
    common = [*SMALL, "train.steps=4", "train.checkpoint_every=2"]
    Trainer(train_config.load(TOY, [*common, f"out_dir={tmp_path / 'small'}"])).run(progress=False)
    Trainer(train_config.load(TOY, [*common, f"model.hidden={hidden}", f"out_dir={tmp_path / 'big'}"])).run(
        progress=False)
    from difflab.training import checkpoint

    big = checkpoint.latest(tmp_path / "big")
    trainer = Trainer(train_config.load(TOY, [*common, f"out_dir={tmp_path / 'small'}"]))
    meta = json.loads((big / "trainer.json").read_text())["optimizer"]
    with pytest.raises(ValueError, match=r"optimizer state .* has shape .* another model"):
        checkpoint.load_optimizer(trainer.optimizer, load_file(big / "optimizer.safetensors"), meta, "x")


def test_checkpoints_and_previews_leave_the_model_in_training_mode(tmp_path):
    """Writing a checkpoint's pipeline.json once put the live model in eval mode (no dropout after)."""
    cfg = train_config.load(TOY, [*SMALL, "model.dropout=0.1", "train.steps=4", "train.checkpoint_every=1",
                                  "train.sample_every=2", "sample.n=4", f"out_dir={tmp_path}"])
    trainer = Trainer(cfg)
    modes = []
    for _ in trainer.steps():
        modes.append(trainer.model.training)
    assert modes == [True] * 4
    assert not trainer.pipeline().network.training  # the exported copy samples in eval mode
