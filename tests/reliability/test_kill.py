"""kill -9 at random points of a run — mid-step and mid-checkpoint-write — then --resume: the final
weights, EMA and optimizer state equal an uninterrupted run's bit for bit, for the U-Net
(channels-last convolutions) and the DiT."""

import json
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


LATENT = ["data.name='shapes'", "data.options={n=48, resolution=16, seed=0}", "data.batch_size=8",
          "text.encoder='minilm'", "text.max_tokens=12", "latent.train_steps=150", "latent.batch_size=8",
          "latent.model={base_channels=8, channel_mult=[1, 2], norm_groups=4, mid_attention=false}",
          "model.model_channels=16", "model.channel_mult=[1]", "model.num_res_blocks=1", "model.attention_levels=[0]",
          "model.head_dim=16", "model.norm_groups=8", "train.steps=30", "train.checkpoint_every=3",
          "train.num_threads=1", "train.tensorboard=false", "sample.steps=2"]


def _latent_cmd(out, resume=False):
    cmd = [sys.executable, "-m", "difflab", "train", "--no-progress", "--set", f"out_dir={out}"]
    for s in LATENT:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


def test_latent_text_to_image_survives_kill_nine_in_vae_and_diffusion_training(tmp_path):
    """Killed first while the VAE trains (it checkpoints every 100 steps), then during diffusion."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ref = subprocess.run(_latent_cmd(tmp_path / "ref"), capture_output=True, text=True, env=env, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "cut"
    waits = [out / "vae" / "checkpoints", out / "checkpoints" / "step_00000009"]
    for attempt, target in enumerate(waits):
        proc = subprocess.Popen(_latent_cmd(out, resume=attempt > 0), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not target.exists():
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it reached {target}: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(_latent_cmd(out, resume=True), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ref_vae = load_file(tmp_path / "ref" / "vae" / "model.safetensors")
    cut_vae = load_file(out / "vae" / "model.safetensors")
    assert all(torch.equal(ref_vae[k], cut_vae[k]) for k in ref_vae)
    a, b = _state(tmp_path / "ref" / "checkpoints" / "step_00000030"), _state(out / "checkpoints" / "step_00000030")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no record twice after the resumes
