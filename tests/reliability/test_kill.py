"""kill -9 at random points of a run — mid-step and mid-checkpoint-write — then --resume: the final
weights, EMA and optimizer state equal an uninterrupted run's bit for bit, for the U-Net
(channels-last convolutions) and the DiT."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

RECIPES = {
    "unet": ["model.model_channels=16", "model.head_dim=16", "model.norm_groups=8"],
    "dit": ["model={kind='dit', patch_size=2, hidden_size=32, depth=2, num_heads=2}"],
}
COMMON = ["data.batch_size=16", "train.steps=120", "train.checkpoint_every=3", "train.keep_last=3",
          "train.sample_every=0", "train.num_threads=1", "train.tensorboard=false", "optim.warmup_steps=5"]


def _cmd(kind, out, resume=False):
    recipe = "digits" if kind == "unet" else []
    cmd = [sys.executable, "-m", "difflab", "train", *([recipe] if recipe else []), "--no-progress",
           "--set", f"out_dir={out}"]
    sets = [*RECIPES[kind], *COMMON] + ([] if recipe else ["data.name='digits'"])
    for s in sets:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


def _state(ckpt):
    names = ("model", "ema", "optimizer")
    return {f"{n}.{k}": v for n in names for k, v in load_file(ckpt / f"{n}.safetensors").items()}


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_kill_nine_then_resume_is_bit_identical(tmp_path, kind):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(_cmd(kind, tmp_path / "ref"), capture_output=True, text=True, env=env, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    rng = random.Random(kind)
    out = tmp_path / "cut"
    kills = 0
    for attempt in range(3):  # killed up to three times at random moments, resumed each time
        proc = subprocess.Popen(_cmd(kind, out, resume=attempt > 0), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not any((out / "checkpoints").glob("step_*")):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))  # checkpoints every 3 steps: often lands inside a write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        if (out / "final").exists():
            break
    assert kills >= 1, "the run finished before it could be killed"
    if not (out / "final").exists():
        done = subprocess.run(_cmd(kind, out, resume=True), capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = _state(tmp_path / "ref" / "checkpoints" / "step_00000120"), _state(out / "checkpoints" / "step_00000120")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
