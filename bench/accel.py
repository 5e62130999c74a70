"""Training-free acceleration on the trained digits model: does a cache beat taking fewer steps?

For DeepCache at several refresh intervals and depths (20 dpmpp_2m steps) and for the plain
sampler at 20 steps and at fewer steps, on the same seeds and classes: network FLOPs per image
(PyTorch's counter), wall time per image (one thread, configurations interleaved, median of
rounds), FD against the digits test split (digits-classifier features) and the classifier's accuracy
on the requested class. Each cache row is set beside the plain row of nearest FLOPs.

Uses the pipeline of a digits run (``--pipeline``, default outputs/demo/run/final: ``make demo``).
Run by hand, alone on the machine:  python bench/accel.py [--n 2000]
Writes bench/results/accel.json and bench/results/accel.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from difflab import accel, metrics
from difflab.data import Digits
from difflab.metrics.classifiers import accuracy, load_classifier
from difflab.pipeline import Pipeline

RESULTS = Path(__file__).parent / "results"
CONFIGS = [("plain", 20, None), ("plain", 14, None), ("plain", 10, None), ("plain", 8, None), ("plain", 6, None),
           ("deep_cache", 20, {"name": "deep_cache", "interval": 2, "depth": 1}),
           ("deep_cache", 20, {"name": "deep_cache", "interval": 3, "depth": 1}),
           ("deep_cache", 20, {"name": "deep_cache", "interval": 5, "depth": 1}),
           ("deep_cache", 20, {"name": "deep_cache", "interval": 3, "depth": 2})]


def label(config) -> str:
    _, steps, acc = config
    return f"{steps} steps" if acc is None else f"DeepCache N={acc['interval']} depth {acc['depth']}, {steps} steps"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default="outputs/demo/run/final")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(args.pipeline)
    test = Digits("test").x
    classifier, classifier_acc = load_classifier("digits")
    labels = torch.arange(args.n) % 10
    rows: dict[str, dict] = {}
    for config in CONFIGS:
        _, steps, acc = config
        _, flops = accel.count_flops(lambda steps=steps, acc=acc: pipe(seeds=range(10), class_labels=labels[:10],
                                                                       steps=steps, accelerator=acc))
        out = pipe(seeds=range(args.n), class_labels=labels, steps=steps, batch_size=500, accelerator=acc)
        result = metrics.compare(test, out.images, ("fd",), features="digits")
        rows[label(config)] = {"steps": steps, "accelerator": acc, "gflops_per_image": flops / 10 / 1e9,
                               "fd": result["fd"]["value"], "fd_ci": result["fd"]["ci"],
                               "accuracy": accuracy(classifier, out.images, labels), "seconds": []}
        print(f"{label(config):40s} {rows[label(config)]['gflops_per_image']:.4f} GFLOP  FD {result['fd']['value']:.3f}"
              f"  acc {rows[label(config)]['accuracy']:.3f}", flush=True)
    for _ in range(args.rounds):  # wall time, configurations interleaved
        for config in CONFIGS:
            start = time.perf_counter()
            pipe(seeds=range(500), class_labels=labels[:500], steps=config[1], batch_size=500, accelerator=config[2])
            rows[label(config)]["seconds"].append(time.perf_counter() - start)
    base = rows[label(CONFIGS[0])]
    for row in rows.values():
        row["ms_per_image"] = 1000 * sorted(row["seconds"])[len(row["seconds"]) // 2] / 500
        row["speedup_vs_20_steps"] = base["ms_per_image"] / row["ms_per_image"]
        row["flops_ratio_vs_20_steps"] = base["gflops_per_image"] / row["gflops_per_image"]
    plain = {k: r for k, r in rows.items() if r["accelerator"] is None}
    for row in rows.values():
        if row["accelerator"] is not None:
            row["equal_flops_baseline"] = min(plain, key=lambda k: abs(plain[k]["gflops_per_image"]
                                                                          - row["gflops_per_image"]))
    meta = {"pipeline": args.pipeline, "n_samples": args.n, "sampler": pipe.sampler, "threads": 1,
            "reference": "digits test split", "features": "digits classifier", "torch": torch.__version__,
            "classifier_test_accuracy": classifier_acc,
            "timing": f"median of {args.rounds} interleaved rounds, 500 images"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "accel.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| configuration | GFLOP / image | FLOPs saved | ms / image | speed-up | FD | accuracy "
             "| plain sampler at equal FLOPs |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        same = r.get("equal_flops_baseline")
        other = f"{same}: FD {rows[same]['fd']:.2f}, {100 * rows[same]['accuracy']:.1f} %" if same else ""
        lines.append(f"| {name} | {r['gflops_per_image']:.4f} | {r['flops_ratio_vs_20_steps']:.2f}x | "
                     f"{r['ms_per_image']:.2f} | {r['speedup_vs_20_steps']:.2f}x | {r['fd']:.2f} | "
                     f"{100 * r['accuracy']:.1f} % | {other} |")
    text = (f"# Training-free acceleration on the digits model\n\n`python bench/accel.py` (n = {args.n}, "
            f"{pipe.sampler}, classes cycled, the same seeds in every row; FD on digits-classifier features against "
            f"the {len(test)}-image test split; wall time one thread, {meta['timing']}).\n\n" + "\n".join(lines) + "\n")
    (RESULTS / "accel.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
