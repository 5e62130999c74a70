"""Training benchmark.

1. Throughput: images per second of difflab's whole training step (``Trainer.run``: batch, noise and
   t, loss, backward, clipping, AdamW, EMA) against the equivalent hand loop over diffusers'
   ``UNet2DModel`` + ``DDPMScheduler.add_noise`` (noise, timesteps, add_noise, forward, MSE, backward,
   clipping, AdamW, EMA via ``diffusers.training_utils.EMAModel``) at the same model size (the
   matched U-Net pair of bench/networks.py) and batch, on 32x32 RGB shapes. Runs interleaved,
   medians; the per-step time is read between step 5 and the last step (warm-up excluded).
2. Recipe study on digits at an equal wall-clock budget per recipe: eps vs v vs flow, uniform vs
   min-SNR weighting, immiscible noise on/off; each scored by FD / KID / precision / recall with the
   digits features against the test split, and the digits classifier's accuracy on class-conditional
   samples (1000, 20 dpmpp_2m steps).

Run by hand, alone on the machine:  python bench/training.py [--budget 150] [--threads 2]
Writes bench/results/training.json and bench/results/training.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab import metrics
from difflab.data import Digits
from difflab.metrics.classifiers import accuracy, load_classifier
from difflab.training import config as train_config
from difflab.training.trainer import Trainer

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
UNET = {"kind": "unet", "model_channels": 64, "channel_mult": [1, 2, 2], "num_res_blocks": 2,
        "attention_levels": [1, 2], "head_dim": 32}


def difflab_step_seconds(batch: int, steps: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        sets = [f"out_dir={out}", "data.name='shapes'", "data.options={n=512, resolution=32}",
                f"data.batch_size={batch}", f"model={json.dumps(UNET).replace(':', '=')}", "prediction='eps'",
                "process={kind='discrete_vp', beta_schedule='linear'}", f"train.steps={steps}",
                f"train.checkpoint_every={steps}", "train.log_every=1", f"train.num_threads={threads}",
                "train.tensorboard=false", "loss.t_distribution='discrete'", "ema.decay=0.999"]
        trainer = Trainer(train_config.load(None, sets))
        trainer.run(progress=False)
        log = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return (log[-1]["seconds"] - log[4]["seconds"]) / (len(log) - 5)


def diffusers_step_seconds(batch: int, steps: int) -> float:
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    from difflab.metrics.classifiers import shapes_tensors

    torch.manual_seed(0)
    images, _ = shapes_tensors(512, seed=0)
    model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128),
                        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32,
                        norm_num_groups=32, resnet_time_scale_shift="scale_shift")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    ema = EMAModel(model.parameters(), decay=0.999)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        idx = torch.randint(0, len(images), (batch,))
        clean = images[idx]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, 1000, (batch,))
        noisy = scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(model(noisy, timesteps).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.step(model.parameters())
        times.append(time.perf_counter() - start)
    return statistics.mean(times[5:])


def throughput(threads: int, repeats: int, batch: int = 16, steps: int = 25) -> dict:
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(difflab_step_seconds(batch, steps, threads))
        theirs.append(diffusers_step_seconds(batch, steps))
        print(f"step seconds: difflab {ours[-1]:.3f}  diffusers {theirs[-1]:.3f}", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    return {"batch": batch, "difflab_images_per_s": batch / a, "diffusers_images_per_s": batch / b,
            "ratio": b / a, "repeats": repeats}


RECIPES = {
    "flow, uniform (default)": [],
    "flow, immiscible": ["loss.immiscible=true"],
    "v (SD-VP, zero-SNR), uniform": ["prediction='v'", "process={kind='discrete_vp', beta_schedule='scaled_linear', "
                                      "zero_terminal_snr=true}", "loss.t_distribution='uniform'"],
    "v (SD-VP, zero-SNR), min-SNR 5": ["prediction='v'", "process={kind='discrete_vp', beta_schedule='scaled_linear',"
                                        " zero_terminal_snr=true}", "loss.t_distribution='uniform'",
                                        "loss.weighting='min_snr'"],
    "eps (SD-VP), uniform": ["prediction='eps'", "process={kind='discrete_vp', beta_schedule='scaled_linear'}",
                             "loss.t_distribution='uniform'"],
    "eps (SD-VP), min-SNR 5": ["prediction='eps'", "process={kind='discrete_vp', beta_schedule='scaled_linear'}",
                               "loss.t_distribution='uniform'", "loss.weighting='min_snr'"],
}


def recipe_study(budget: float, threads: int) -> list[dict]:
    """Each recipe trains for ``budget`` seconds of its own steps (measured, then the step count set)."""
    classifier, _ = load_classifier("digits")
    test = Digits("test").x
    labels = torch.arange(10).repeat_interleave(100)
    rows = []
    for name, sets in RECIPES.items():
        with tempfile.TemporaryDirectory() as out:
            base = [f"out_dir={out}", f"train.num_threads={threads}", "train.tensorboard=false",
                    "train.sample_every=0", *sets]
            probe = Trainer(train_config.load("digits", [*base, "train.steps=30",
                                                                                 "train.log_every=1"]))
            probe.run(progress=False)
            log = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            per_step = (log[-1]["seconds"] - log[4]["seconds"]) / (len(log) - 5)
            steps = int(budget / per_step)
        with tempfile.TemporaryDirectory() as out:
            cfg = train_config.load("digits",
                                    [f"out_dir={out}", f"train.num_threads={threads}", "train.tensorboard=false",
                                     "train.sample_every=0", f"train.steps={steps}",
                                     f"train.checkpoint_every={steps}", *sets])
            trainer = Trainer(cfg)
            start = time.time()
            trainer.run(progress=False)
            seconds = time.time() - start
            samples = trainer.pipeline()(class_labels=labels, seed=0, batch_size=500).images
        result = metrics.compare(test, samples, features="digits")
        row = {"recipe": name, "steps": steps, "train_seconds": round(seconds, 1),
               "accuracy": accuracy(classifier, samples, labels), **result, "overrides": copy.copy(sets)}
        rows.append(row)
        print(f"{name:34s} steps {steps:5d}  acc {row['accuracy']:.3f}  FD {result['fd']['value']:.3f}  "
              f"P {result['pr']['precision']:.3f}  R {result['pr']['recall']:.3f}", flush=True)
    return rows


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per recipe")
    parser.add_argument("--skip-study", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    speed = throughput(args.threads, args.repeats)
    study = [] if args.skip_study else recipe_study(args.budget, args.threads)
    meta = {"threads": args.threads, "budget_seconds": args.budget, "torch": torch.__version__,
            "diffusers": diffusers.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps({"meta": meta, "throughput": speed, "study": study}, indent=1))
    lines = ["# Training benchmark", "", "`python bench/training.py` (alone on the machine, "
             f"{args.threads} threads, torch {torch.__version__}, diffusers {diffusers.__version__}).", "",
             "## Throughput: the whole training step, U-Net 32x32 RGB (the bench/networks.py pair), batch "
             f"{speed['batch']}", "", "| | images / s |", "|---|---|",
             f"| difflab `Trainer` | {speed['difflab_images_per_s']:.1f} |",
             "| diffusers `UNet2DModel` + `DDPMScheduler.add_noise` hand loop | "
             f"{speed['diffusers_images_per_s']:.1f} |",
             f"| ratio (difflab / diffusers) | **{speed['ratio']:.2f}x** |", ""]
    if study:
        lines += [f"## Recipe study: digits, {args.budget:.0f} s of training each, 1000 class-conditional samples "
                  "(20 dpmpp_2m steps)", "",
                  metrics.table([{**r, "acc": f"{100 * r['accuracy']:.1f} %"} for r in study],
                                ["recipe", "steps", "acc"]), ""]
    (RESULTS / "training.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
