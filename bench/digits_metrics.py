"""Digits demo model: FD / KID / precision-recall (digits-classifier features) against the test split,
by sampler and number of steps, with the real-vs-real floor (train split vs test split).

Uses the pipeline of a trained digits run (``--pipeline``, default outputs/digits/final; train it with
``difflab train digits``). Class labels cycle 0..9; seeds 0..n-1 for every row, so the
rows differ only by sampler and steps. Classifier accuracy on the samples is reported beside.

Run by hand, alone on the machine:  python bench/digits_metrics.py [--n 2000]
Writes bench/results/digits_metrics.json and bench/results/digits_metrics.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from difflab import metrics
from difflab.data import Digits
from difflab.metrics.classifiers import accuracy, load_classifier
from difflab.pipeline import Pipeline

RESULTS = Path(__file__).parent / "results"
SAMPLERS = ["euler", "heun", "dpmpp_2m", "unipc"]
STEPS = [5, 10, 20, 50]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default="outputs/digits/final")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.pipeline)
    test, train = Digits("test").x, Digits("train").x
    classifier, classifier_acc = load_classifier("digits")
    floor = metrics.compare(test, train, features="digits")
    rows = [{"sampler": "real (train split)", "steps": "-", "nfe": "-", **floor}]
    labels = torch.arange(args.n) % 10
    for sampler in SAMPLERS:
        for steps in STEPS:
            start = time.time()
            out = pipe(seeds=range(args.n), class_labels=labels, steps=steps, sampler=sampler, batch_size=500)
            result = metrics.compare(test, out.images, features="digits")
            result["accuracy"] = accuracy(classifier, out.images, labels)
            result["seconds"] = round(time.time() - start, 1)
            rows.append({"sampler": sampler, "steps": steps, "nfe": out.settings[0]["denoiser_calls"], **result})
            print(f"{sampler:10s} {steps:3d}  FD {result['fd']['value']:.3f}  KID {result['kid']['value']:.3f}  "
                  f"P {result['pr']['precision']:.3f}  R {result['pr']['recall']:.3f}  acc {result['accuracy']:.3f}",
                  flush=True)
    meta = {"pipeline": args.pipeline, "n_samples": args.n, "reference": "digits test split",
            "features": "digits classifier (64-d pooled)", "classifier_test_accuracy": classifier_acc,
            "threads": args.threads, "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "digits_metrics.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = metrics.table(rows, ["sampler", "steps", "nfe"])
    acc = "\n".join(f"- {r['sampler']} {r['steps']} steps: {100 * r['accuracy']:.1f} %"
                    for r in rows if "accuracy" in r)
    text = (f"# Digits demo model: distribution metrics vs sampler and steps\n\n`python bench/digits_metrics.py` "
            f"(n = {args.n} samples, classes cycled; reference: the {len(test)} images of the digits test split; "
            f"features: difflab's digits classifier, {100 * classifier_acc:.1f} % test accuracy). The first row is "
            "the floor: the train split against the test split.\n\n" + table +
            "\n\nClassifier accuracy of the samples on their requested class:\n\n" + acc + "\n")
    (RESULTS / "digits_metrics.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
