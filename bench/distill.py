"""Distilled digits students against their teacher: FD, precision/recall and classifier accuracy at 1, 2
and 4 network evaluations, beside the teacher at 20 and 50 and the teacher's best sampler at the same
1 / 2 / 4 evaluations; training time of each recipe from its metrics.jsonl.

Train first (alone on the machine): ``difflab train digits``, then ``digits_consistency``,
``digits_progressive``, ``digits_reflow``, ``digits_instaflow`` (which distils the reflowed model) ,
``digits_shortcut``, ``digits_dmd2``, ``digits_dmd2_gan``, ``digits_perflow`` and ``digits_ladd``; ``difflab adapt
digits_lcm_lora`` (a LoRA on the teacher itself, measured loaded onto it).
Run by hand, alone:  python bench/distill.py [--runs outputs] [--n 2000] [--only lcm-lora,...]
(``--only``: the teacher and those students, written to distill_NAME[_NAME...].{json,md,png}).
Writes bench/results/distill.{json,md,png}. ``--straightness`` only measures how straight the teacher's
and the flow students' paths are (Liu et al. 2023) and writes bench/results/distill_straightness.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from difflab import metrics
from difflab.data import Digits
from difflab.metrics.classifiers import accuracy, load_classifier
from difflab.pipeline import Pipeline

RESULTS = Path(__file__).parent / "results"
#: the teacher's candidates at each budget of evaluations: (sampler, steps, schedule)
TEACHER_AT = {1: [("euler", 1, "trailing"), ("heun", 1, "trailing")],
              2: [("euler", 2, "trailing"), ("dpmpp_2m", 2, "trailing"), ("unipc", 2, "trailing"),
                  ("dpmpp_2m", 2, "karras")],
              4: [("euler", 4, "trailing"), ("dpmpp_2m", 4, "trailing"), ("unipc", 4, "trailing"),
                  ("dpmpp_2m", 4, "karras"), ("unipc", 4, "karras"), ("heun", 2, "karras")]}
STUDENTS = {"consistency": "digits_consistency", "progressive": "digits_progressive", "reflow": "digits_reflow",
            "instaflow": "digits_instaflow", "shortcut": "digits_shortcut",
            "dmd2": "digits_dmd2", "dmd2+gan": "digits_dmd2_gan", "perflow": "digits_perflow",
            "ladd": "digits_ladd"}
#: students that are LoRAs on the teacher (an adapter folder each)
LORA_STUDENTS = {"lcm-lora": "digits_lcm_lora"}


def training_seconds(run: Path) -> float | None:
    """The seconds a run's training took (progressive: the sum of its rounds), from metrics.jsonl."""
    logs = sorted(run.glob("round_*/metrics.jsonl")) or [run / "metrics.jsonl"]
    total = 0.0
    for log in logs:
        if not log.is_file():
            return None
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        total += lines[-1]["seconds"] if lines else 0.0
    return round(total, 1)


def adapter_seconds(folder: Path) -> float | None:
    """The seconds an adapter recipe's training took, from its training.jsonl."""
    log = folder / "training.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    return round(lines[-1]["seconds"], 1) if lines else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="outputs", help="folder holding digits/ and the digits_* runs")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--straightness", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated students: measure the teacher and only these, "
                                                   "into distill_NAME.{json,md,png}")
    args = parser.parse_args()
    only = [name for name in args.only.split(",") if name]
    unknown = sorted(set(only) - set(STUDENTS) - set(LORA_STUDENTS))
    if unknown:
        parser.error(f"--only: unknown student(s) {', '.join(unknown)}; known: "
                     f"{', '.join([*STUDENTS, *LORA_STUDENTS])}")
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    if args.straightness:
        return straightness_table(runs)
    test = Digits("test").x
    classifier, classifier_acc = load_classifier("digits")
    labels = torch.arange(args.n) % 10
    rows: list[dict] = []

    def measure(model: str, pipe: Pipeline, sampler: str, steps: int, schedule: str, **extra) -> dict:
        start = time.time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = pipe(seeds=range(args.n), class_labels=labels, steps=steps, sampler=sampler, schedule=schedule,
                       batch_size=500, loras=extra.pop("loras", None))
        result = metrics.compare(test, out.images, features="digits")
        row = {"model": model, "sampler": sampler, "steps": steps, "schedule": schedule,
               "nfe": out.settings[0]["denoiser_calls"], **result, "accuracy": accuracy(classifier, out.images, labels),
               "seconds": round(time.time() - start, 1),
               "as_trained": not any("student trained for" in str(w.message) for w in caught), **extra}
        print(f"{model:12s} {sampler:11s} {steps:3d} nfe {row['nfe']:3d}  FD {result['fd']['value']:.3f}  "
              f"P {result['pr']['precision']:.3f}  R {result['pr']['recall']:.3f}  acc {row['accuracy']:.3f}",
              flush=True)
        rows.append(row)
        return row

    teacher = Pipeline.from_pretrained(runs / "digits" / "final")
    for steps in (20, 50):
        measure("teacher", teacher, "dpmpp_2m", steps, "karras")
    for budget, candidates in TEACHER_AT.items():
        tried = [measure("teacher", teacher, *c, budget=budget) for c in candidates]
        best = min(tried, key=lambda r: r["fd"]["value"])
        best["best_at_budget"] = True
    for name, folder in STUDENTS.items():
        final = runs / folder / "final"
        if only and name not in only:
            continue
        if not final.is_dir():
            print(f"skipping {name}: {final} is missing")
            continue
        pipe = Pipeline.from_pretrained(final)
        seconds = training_seconds(runs / folder)
        for steps in (1, 2, 4):
            measure(name, pipe, pipe.sampler, steps, pipe.schedule, train_seconds=seconds)
    for name, folder in LORA_STUDENTS.items():
        if (only and name not in only) or not (runs / folder / "lora.json").is_file():
            print(f"skipping {name}: {runs / folder} holds no LoRA")
            continue
        from difflab.adapters import LoRA

        lora = LoRA.from_pretrained(runs / folder, teacher.network, base_identity=teacher.identity())
        for steps in (1, 2, 4):
            measure(name, teacher, lora.student["sampler"], steps, "trailing", loras=[(lora, 1.0)],
                    train_seconds=adapter_seconds(runs / folder), lora_parameters=sum(
                        p.numel() for p in lora.parameters()))
    meta = {"runs": str(runs), "n_samples": args.n, "reference": "digits test split", "threads": args.threads,
            "features": "digits classifier (64-d pooled)", "classifier_test_accuracy": classifier_acc,
            "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    stem = "_".join(["distill", *(name.replace("+", "_").replace("-", "_") for name in only)])
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, RESULTS / f"{stem}.png")
    shown = [r for r in rows if r["model"] != "teacher" or "budget" not in r or r.get("best_at_budget")]
    table = metrics.table([{**r, "acc": f"{100 * r['accuracy']:.1f} %",
                            "trained": "-" if r["model"] == "teacher" else ("yes" if r["as_trained"] else "no"),
                            "train s": r.get("train_seconds", "-")} for r in shown],
                          ["model", "sampler", "steps", "schedule", "nfe", "acc", "trained", "train s"])
    text = (f"# Distillation on digits: students at 1, 2 and 4 evaluations\n\n`python bench/distill.py` (n = "
            f"{args.n} samples, classes cycled, seeds 0..n-1 for every row; reference: the {len(test)} images of "
            f"the digits test split; features: difflab's digits classifier, {100 * classifier_acc:.1f} % test "
            "accuracy). Teacher rows at 1/2/4 evaluations are the best of "
            + ", ".join(f"{len(c)} samplers at {b}" for b, c in TEACHER_AT.items())
            + " (all in distill.json). `trained`: whether the student was trained for that step count "
            "(a progressive student learns one). Training seconds: the training loop on one thread of this "
            "shared CPU, with other jobs running (reflow and instaflow make their 10000 teacher pairs before "
            "it, not counted). `lcm-lora`: a LoRA on the teacher itself (Luo et al. 2023), loaded onto it.\n\n"
            + table + f"\n\n![FD against evaluations]({stem}.png)\n")
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


def straightness_table(runs: Path, n: int = 1000, steps: int = 32) -> None:
    """Straightness of the teacher's and each rectified-flow student's ODE paths from the same noise."""
    from difflab.metrics.ode_error import straightness

    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 10
    rows = []
    for name, folder in [("teacher", "digits"), *((k, v) for k, v in STUDENTS.items())]:
        final = runs / folder / "final"
        if not final.is_dir():
            continue
        pipe = Pipeline.from_pretrained(final)
        if pipe.process.to_config()["kind"] != "flow" or getattr(pipe.network.config, "step_size_embedding", False):
            continue  # straightness is of a flow's own velocity field
        with torch.no_grad():
            value = straightness(pipe.denoiser(), noise, steps=steps, cond={"class_labels": labels})
        rows.append({"model": name, "straightness": value})
        print(f"{name:12s} {value:.5f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_straightness.json").write_text(json.dumps({"n": n, "euler_steps": steps, "rows": rows},
                                                                  indent=1))
    lines = [f"| {r['model']} | {r['straightness']:.4f} |" for r in rows]
    (RESULTS / "distill_straightness.md").write_text(
        "# Straightness of the digits flows (Liu et al. 2023, Eq. 4)\n\n`python bench/distill.py --straightness`: "
        f"mean over a {steps}-step Euler path of ||(x_1 - x_0) - v(x_t, t)||^2 per pixel, {n} noises, classes "
        "cycled. 0 is a straight path (one Euler step exact). Reflow straightens the teacher's paths 20x; the "
        "consistency, progressive, DMD2 and PeRFlow students' fields are not one ODE's velocity, shown for "
        "completeness.\n\n"
        "| model | straightness |\n|---|---|\n"
        + "\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    best = [r for r in rows if r.get("best_at_budget")]
    ax.plot([r["nfe"] for r in best], [r["fd"]["value"] for r in best], "ks--", label="teacher, best sampler")
    for model in sorted({r["model"] for r in rows} - {"teacher"}):
        rs = [r for r in rows if r["model"] == model]
        ax.plot([r["nfe"] for r in rs], [r["fd"]["value"] for r in rs], "o-", label=model)
    for r in rows:
        if r["model"] == "teacher" and "budget" not in r:
            ax.axhline(r["fd"]["value"], color="grey", lw=0.8, ls=":")
            ax.annotate(f"teacher {r['nfe']} NFE", (4, r["fd"]["value"]), fontsize=8, ha="right", va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1, 2, 4])
    ax.set_xticklabels(["1", "2", "4"])
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel("FD (digits features, lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
