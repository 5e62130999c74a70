"""Few-step solvers (issue #19) on trained networks: FD (and accuracy) at 3-10 evaluations for
difflab's fixed samplers on named schedules, against the same model calibrated by ``Pipeline.tune``
(UniPC-2: grid + DC-Solver ratios) and with ``bespoke=True`` (every coefficient fitted, BNS).

digits (class-conditional): calibration on 64 images (seeds 0..63, classes cycled), measurement on n
images from seeds 10000.. (never calibrated on), FD with the digits classifier's features against the
test split, classifier accuracy. shapes (text-to-image, the pipeline's CFG): calibration on 32 prompts,
measurement on every caption x --per-prompt from seeds 10000.., FD with the shapes classifier's
features against 2000 real images, prompt accuracy. Both against dpmpp_3m at 100 steps.

Train first (alone):  difflab train digits --set out_dir=runs/digits   (or shapes_t2i)
Run by hand, alone:   python bench/fewest_steps_models.py --model digits --pipeline runs/digits/final
Writes bench/results/fewest_steps_{digits,shapes}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from difflab import metrics
from difflab.data import Digits
from difflab.data.shapes import all_captions
from difflab.metrics.classifiers import accuracy, load_classifier
from difflab.metrics.prompt_accuracy import prompt_accuracy
from difflab.metrics.reference import load_reference
from difflab.pipeline import Pipeline

RESULTS = Path(__file__).parent / "results"
NFES = [3, 4, 5, 6, 8, 10]
FIXED = [("unipc", {"order": 2}), ("dpmpp_2m", {}), ("deis", {}), ("ipndm", {})]
SCHEDULES = ["trailing", "uniform", "karras", "logsnr"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("digits", "shapes"), default="digits")
    parser.add_argument("--pipeline", default="runs/digits/final")
    parser.add_argument("--n", type=int, default=1000, help="digits: images measured")
    parser.add_argument("--per-prompt", type=int, default=4, help="shapes: images per caption measured")
    parser.add_argument("--tuned-nfe", default="3,4,5,6")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.pipeline)
    tuned_nfes = [int(v) for v in args.tuned_nfe.split(",")]
    if args.model == "digits":
        reference, features = Digits("test").x, "digits"
        classifier, classifier_acc = load_classifier("digits")
        seeds, labels = range(10000, 10000 + args.n), torch.arange(args.n) % 10
        given = {"class_labels": labels}
        calib = dict(n=64, seed=0, class_labels=torch.arange(64) % 10, progress=True)

        def score(images: torch.Tensor) -> float:
            return accuracy(classifier, images, labels)
    else:
        reference, features, classifier_acc = load_reference("shapes", n=2000), "shapes", None
        prompts = [c for c in all_captions() for _ in range(args.per_prompt)]
        seeds, given = range(10000, 10000 + len(prompts)), {"prompts": prompts}
        captions = all_captions()
        calib = dict(n=32, seed=0, prompts=[captions[(7 * i) % len(captions)] for i in range(32)], progress=True)

        def score(images: torch.Tensor) -> float:
            return prompt_accuracy(images, prompts)["accuracy"]
    rows: list[dict] = []

    def measure(kind: str, steps: int, **kw) -> dict:
        out = pipe(seeds=seeds, steps=steps, batch_size=500, **given, **kw)
        result = metrics.compare(reference, out.images, features=features)
        row = {"kind": kind, "steps": steps, "nfe": out.settings[0]["denoiser_calls"],
               "sampler": out.settings[0]["sampler"], "schedule": kw.get("schedule", "tuned"),
               "options": {k: v for k, v in out.settings[0]["sampler_options"].items() if k != "coefficients"},
               "fd": result["fd"]["value"], "precision": result["pr"]["precision"], "recall": result["pr"]["recall"],
               "accuracy": score(out.images)}
        print(f"{kind:8s} {row['sampler']:9s} {row['schedule']:9s} NFE {row['nfe']:2d}  FD {row['fd']:.3f}  "
              f"acc {row['accuracy']:.3f}", flush=True)
        rows.append(row)
        return row

    for steps in NFES:
        for name, opts in FIXED:
            for schedule in SCHEDULES:
                measure("fixed", steps, sampler=name, schedule=schedule, **opts)
    tuning = {}
    for kind, bespoke in (("tuned", False), ("bespoke", True)):
        started = time.perf_counter()
        report = pipe.tune(tuned_nfes, sampler="unipc", sampler_options={"order": 2}, bespoke=bespoke, **calib)
        tuning[kind] = {"seconds": round(time.perf_counter() - started, 1), "report": report,
                        "samplers": {s: pipe.calibration[s].spec.name for s in tuned_nfes}}
        for steps in tuned_nfes:
            row = measure(kind, steps, calibrated=True)
            row["tune_seconds"] = round(report[steps]["seconds"], 1)
    meta = {"model": args.model, "pipeline": args.pipeline, "n_samples": len(seeds),
            "seeds": f"{seeds.start}..{seeds.stop - 1}",
            "reference": "digits test split" if args.model == "digits" else "2000 real shapes",
            "classifier_test_accuracy": classifier_acc, "threads": args.threads,
            "torch": torch.__version__, "guidance": pipe.guidance, "tuning": tuning}
    RESULTS.mkdir(exist_ok=True)
    name = f"fewest_steps_{args.model}"
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Few-step solvers on the {args.model} model", "",
             f"FD ({features}-classifier features, {len(seeds)} samples from seeds never calibrated on, against "
             f"{meta['reference']}) by network evaluations; acc: "
             + ("classifier accuracy" if args.model == "digits" else "prompt accuracy (all attributes right)")
             + f". Fixed: the best of {len(FIXED)} one-evaluation samplers x "
             f"{len(SCHEDULES)} named schedules. Tuned: `Pipeline.tune` (UniPC-2, grid + DC ratios) on "
             f"{calib['n']} images against dpmpp_3m at 100 steps; bespoke: the same with `bespoke=True`. "
             "Fixed NFE for that FD: the fewest evaluations at which the best fixed sampler is as good.", "",
             "| NFE | best fixed | FD | acc | tuned FD | acc | bespoke FD | acc | fixed NFE for tuned FD | "
             "fixed NFE for bespoke FD | tune s | bespoke s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fixed = {s: min((r for r in rows if r["kind"] == "fixed" and r["steps"] == s), key=lambda r: r["fd"])
             for s in NFES}

    def needed(fd: float) -> str:
        ok = [s for s in NFES if fixed[s]["fd"] <= fd]
        return str(min(ok)) if ok else f"> {max(NFES)}"

    for s in NFES:
        f = fixed[s]
        t = next((r for r in rows if r["kind"] == "tuned" and r["steps"] == s), None)
        b = next((r for r in rows if r["kind"] == "bespoke" and r["steps"] == s), None)
        cells = [f"{f['sampler']} {f['schedule']}", f"{f['fd']:.3f}", f"{100 * f['accuracy']:.1f}"]
        for r in (t, b):
            cells += [f"{r['fd']:.3f}", f"{100 * r['accuracy']:.1f}"] if r else ["-", "-"]
        cells += [needed(t["fd"]) if t else "-", needed(b["fd"]) if b else "-",
                  str(t["tune_seconds"]) if t else "-", str(b["tune_seconds"]) if b else "-"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", f"![FD against evaluations]({name}.png)", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    plot(rows, fixed, RESULTS / f"{name}.png")
    print("\n".join(lines))


def plot(rows: list[dict], fixed: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(list(fixed), [r["fd"] for r in fixed.values()], "ks--", label="best fixed sampler")
    for kind, style in (("tuned", "o-"), ("bespoke", "D-")):
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["steps"])
        ax.plot([r["steps"] for r in rs], [r["fd"] for r in rs], style, label=f"calibrated ({kind})")
    ax.set_xlabel("network evaluations")
    ax.set_ylabel("FD (classifier features)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
