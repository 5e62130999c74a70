"""End to end against diffusers at equal quality (issue #17): the same trained difflab network,
sampled by difflab (fixed samplers on named grids, and the model-calibrated solver of
``Pipeline.tune``) and by diffusers' schedulers driving it through a diffusers-style model wrapper
and the loop a diffusers pipeline runs. For a quality target, each library's cheapest
configuration reaching it, and images per second side by side.

digits (class-conditional flow U-Net, no guidance unless --cfg): n images from seeds 10000..,
classes cycled, the same noise on both sides; FD on the digits classifier's features against the
test split, classifier accuracy. Targets: the FD of diffusers' best configuration at 10 and 20
evaluations. Wall time one thread, median of 3 interleaved rounds, 500 images per call.

Train first (alone):  difflab train digits --set out_dir=runs/digits
Run by hand, alone:   python bench/e2e_diffusers.py --pipeline runs/digits/final
Writes bench/results/e2e_diffusers.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
import difflab
from difflab import metrics, processes
from difflab.data import Digits
from difflab.metrics.classifiers import accuracy, load_classifier
from difflab.pipeline import Pipeline
from samplers import diffusers_specs

RESULTS = Path(__file__).parent / "results"
NFES = [4, 5, 6, 8, 10, 15, 20]
FIXED = [("unipc", {"order": 2}), ("dpmpp_2m", {}), ("deis", {}), ("ipndm", {})]
SCHEDULES = ["trailing", "uniform", "karras", "logsnr"]
TUNED = [4, 5, 6]
N_TRAIN = 1000  # diffusers' flow schedulers give timesteps as 1000 sigma


class DiffusersModel(torch.nn.Module):
    """A difflab denoiser seen as a diffusers flow model: ``model(sample, timestep, class_labels)``
    with diffusers' flow timestep (1000 sigma) returns ``(velocity,)``, velocity = eps - x0, what
    diffusers' flow schedulers (``FlowMatch*``, and the multistep ones with
    ``prediction_type="flow_prediction"``) step with."""

    def __init__(self, denoiser: difflab.Denoiser, guidance_scale: float = 1.0):
        super().__init__()
        process = denoiser.process
        if not isinstance(process, processes.Flow) or process.shift != 1.0:
            raise ValueError("the diffusers wrapper expects a rectified-flow model without time shift (t = sigma)")
        self.denoiser, self.guidance_scale = denoiser, guidance_scale

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        t = (torch.as_tensor(timestep, dtype=sample.dtype) / N_TRAIN).expand(len(sample))
        if self.guidance_scale == 1.0:
            return (self.denoiser.velocity(sample, t, class_labels=class_labels),)
        # a diffusers pipeline's CFG: one batch of [uncond, cond], then u + w (c - u)
        both = self.denoiser.velocity(torch.cat([sample, sample]), torch.cat([t, t]),
                                      class_labels=torch.cat([torch.full_like(class_labels, -1), class_labels]))
        uncond, cond = both.chunk(2)
        return (uncond + self.guidance_scale * (cond - uncond),)


def diffusers_sample(model: DiffusersModel, scheduler, noise: torch.Tensor, labels: torch.Tensor,
                     steps: int) -> torch.Tensor:
    """The denoising loop of a diffusers pipeline."""
    scheduler.set_timesteps(steps)
    latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # the FlowMatch ones have neither (as SD 3's loop)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    for timestep in scheduler.timesteps:
        velocity = model(scale(latents, timestep), timestep, labels)[0]
        latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
    return latents.clamp(-1, 1)


def seeded_noise(pipe: Pipeline, seeds: range) -> torch.Tensor:
    """The pipeline's own starting noise for these seeds (one generator per seed)."""
    return torch.stack([torch.randn(pipe.sample_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def scheduler_calls(cls_name: str, kwargs: dict, steps: int) -> int | None:
    import diffusers

    try:
        sched = getattr(diffusers, cls_name)(**kwargs)
        sched.set_timesteps(steps)
        return len(sched.timesteps)
    except Exception:
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default="runs/digits/final")
    parser.add_argument("--n", type=int, default=1000, help="images per quality measurement")
    parser.add_argument("--cfg", type=float, default=1.0, help="CFG scale on both sides (1: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--table", action="store_true", help="only write the table and plot again from the JSON")
    args = parser.parse_args()
    if args.table:
        report = json.loads((RESULTS / "e2e_diffusers.json").read_text())
        write_table(report)
        plot(report)
        return
    torch.set_num_threads(args.threads)
    import diffusers

    pipe = Pipeline.from_pretrained(args.pipeline)
    if pipe.num_classes is None:
        raise SystemExit("this benchmark drives a class-conditional pipeline (digits)")
    classifier, _ = load_classifier("digits")
    reference = Digits("test").x
    seeds = range(10000, 10000 + args.n)
    labels = torch.arange(args.n) % pipe.num_classes
    noise = seeded_noise(pipe, seeds)
    guidance = {"guidance": "cfg", "guidance_options": {"scale": args.cfg}} if args.cfg != 1.0 else {"guidance": None}
    model = DiffusersModel(pipe.denoiser(), args.cfg).eval()
    rows: list[dict] = []

    def score(images: torch.Tensor) -> dict:
        result = metrics.compare(reference, images, features="digits")
        return {"fd": result["fd"]["value"], "recall": result["pr"]["recall"],
                "accuracy": accuracy(classifier, images, labels)}

    for label, cls_name, kwargs in tqdm(diffusers_specs("flow_velocity"), desc="diffusers", unit="scheduler"):
        calls = {s: scheduler_calls(cls_name, kwargs, s) for s in range(1, max(NFES) + 2)}
        done = set()
        for budget in NFES:
            steps = max((s for s, c in calls.items() if c is not None and c <= budget), default=None)
            if steps is None or steps in done:
                continue
            done.add(steps)
            try:
                with torch.no_grad():
                    images = diffusers_sample(model, getattr(diffusers, cls_name)(**kwargs), noise, labels, steps)
                rows.append({"library": "diffusers", "config": label, "class": cls_name, "kwargs": kwargs,
                             "steps": steps, "nfe": calls[steps], **score(images)})
            except Exception as exc:  # a scheduler that fails at this step count is a result too
                rows.append({"library": "diffusers", "config": label, "steps": steps, "error": repr(exc)[:200]})
    for (name, opts) in tqdm(FIXED, desc="difflab", unit="sampler"):
        for schedule in SCHEDULES:
            for steps in NFES:
                out = pipe(seeds=seeds, class_labels=labels, steps=steps, sampler=name, schedule=schedule,
                           batch_size=500, **guidance, **opts)
                rows.append({"library": "difflab", "config": f"{name} {schedule}", "sampler": name,
                             "schedule": schedule, "options": opts, "steps": steps,
                             "nfe": out.settings[0]["denoiser_calls"], **score(out.images)})
    started = time.perf_counter()
    pipe.tune(TUNED, sampler="unipc", sampler_options={"order": 2}, n=64, seed=0,
              class_labels=torch.arange(64) % pipe.num_classes, progress=True, **guidance)
    tune_seconds = round(time.perf_counter() - started, 1)
    for steps in TUNED:
        out = pipe(seeds=seeds, class_labels=labels, steps=steps, calibrated=True, batch_size=500, **guidance)
        rows.append({"library": "difflab", "config": "calibrated unipc", "calibrated": True,
                     "steps": steps, "nfe": out.settings[0]["denoiser_calls"], **score(out.images)})

    ok = [r for r in rows if "fd" in r]

    def best_at(library: str, nfe: int) -> dict:
        return min((r for r in ok if r["library"] == library and r["nfe"] <= nfe), key=lambda r: r["fd"])

    def cheapest(library: str, fd: float) -> dict | None:
        hits = [r for r in ok if r["library"] == library and r["fd"] <= fd]
        return min(hits, key=lambda r: (r["nfe"], r["fd"])) if hits else None

    targets = []
    for nfe in (10, 20):
        target = best_at("diffusers", nfe)
        targets.append({"name": f"diffusers' best at {nfe} NFE", "fd": target["fd"],
                        "diffusers": cheapest("diffusers", target["fd"]), "difflab": cheapest("difflab", target["fd"])})

    # wall time of the chosen configurations, interleaved, on the first 500 images
    timed_seeds, timed_labels = seeds[:500], labels[:500]

    def runner(row: dict):
        if row["library"] == "diffusers":
            sched = getattr(diffusers, row["class"])(**row["kwargs"])
            return lambda: diffusers_sample(model, sched, seeded_noise(pipe, timed_seeds), timed_labels, row["steps"])
        if row.get("calibrated"):
            return lambda: pipe(seeds=timed_seeds, class_labels=timed_labels, steps=row["steps"], calibrated=True,
                                batch_size=500, **guidance)
        return lambda: pipe(seeds=timed_seeds, class_labels=timed_labels, steps=row["steps"], sampler=row["sampler"],
                            schedule=row["schedule"], batch_size=500, **guidance, **row["options"])

    chosen = {id(r): r for t in targets for r in (t["diffusers"], t["difflab"]) if r is not None}
    times: dict[int, list[float]] = {k: [] for k in chosen}
    with torch.no_grad():
        for _ in range(args.rounds):
            for key, row in chosen.items():
                run = runner(row)
                started = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - started)
    for key, row in chosen.items():
        row["images_per_second"] = round(500 / statistics.median(times[key]), 1)

    meta = {"pipeline": args.pipeline, "n": args.n, "seeds": f"{seeds.start}..{seeds.stop - 1}",
            "cfg": args.cfg, "threads": args.threads, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "tune_seconds": tune_seconds, "tuned": TUNED}
    RESULTS.mkdir(exist_ok=True)
    report = {"meta": meta, "targets": targets, "rows": rows}
    (RESULTS / "e2e_diffusers.json").write_text(json.dumps(report, indent=1))
    write_table(report)
    plot(report)


def _cell(row: dict | None) -> list[str]:
    if row is None:
        return ["not reached", "-", "-", "-", "-"]
    return [row["config"], str(row["nfe"]), f"{row['fd']:.3f}", f"{100 * row['accuracy']:.1f} %",
            f"{row['images_per_second']:.0f}"]


def write_table(report: dict) -> None:
    meta, rows = report["meta"], [r for r in report["rows"] if "fd" in r]
    lines = ["# difflab against diffusers at equal quality (digits)", "",
             f"`python bench/e2e_diffusers.py --pipeline {meta['pipeline']}` (diffusers {meta['diffusers']}, "
             f"torch {meta['torch']}, {meta['threads']} thread): the same trained network, sampled by difflab and by "
             "diffusers' schedulers through a diffusers-style model wrapper and a diffusers pipeline's loop; "
             f"n = {meta['n']} from seeds {meta['seeds']}, the same noise on both sides"
             + (f", CFG {meta['cfg']}" if meta["cfg"] != 1.0 else ", no guidance")
             + "; FD on digits-classifier features against the test split. For each target the cheapest "
             "configuration of each library that reaches it; images per second one thread, 500 images per call, "
             "median of interleaved rounds. "
             f"Calibration (`Pipeline.tune`, NFE {', '.join(map(str, meta['tuned']))}): {meta['tune_seconds']} s.",
             "", "| target FD | library | configuration | NFE | FD | accuracy | images / s | speed-up |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for t in report["targets"]:
        base = t["diffusers"]["images_per_second"] if t["diffusers"] else None
        for library in ("diffusers", "difflab"):
            row = t[library]
            speed = f"{row['images_per_second'] / base:.2f}x" if row and base else "-"
            lines.append(f"| {t['fd']:.3f} ({t['name']}) | {library} | " + " | ".join(_cell(row)) + f" | {speed} |")
    lines += ["", "Best FD within each budget (at most that many evaluations; the NFE used in brackets):", "",
              "| NFE | diffusers | FD | difflab | FD |", "|---:|---|---:|---|---:|"]
    for nfe in NFES:
        cells = []
        for library in ("diffusers", "difflab"):
            r = min((r for r in rows if r["library"] == library and r["nfe"] <= nfe), key=lambda r: r["fd"])
            cells += [r["config"] + f" ({r['nfe']})", f"{r['fd']:.3f}"]
        lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
    lines += ["", "![FD against evaluations](e2e_diffusers.png)", ""]
    (RESULTS / "e2e_diffusers.md").write_text("\n".join(lines))
    print("\n".join(lines))


def plot(report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "fd" in r]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for library, style in (("diffusers", "^:"), ("difflab", "o-")):
        best = [min(r["fd"] for r in rows if r["library"] == library and r["nfe"] <= n) for n in NFES]
        ax.plot(NFES, best, style, label=f"{library}, best configuration")
    for t in report["targets"]:
        ax.axhline(t["fd"], color="grey", lw=0.6, ls="--")
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel("FD (digits features)")
    ax.set_title("the same digits network, two libraries")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "e2e_diffusers.png", dpi=120)


if __name__ == "__main__":
    main()
