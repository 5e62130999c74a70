"""Training-free acceleration on the trained digits model: does an accelerator beat taking fewer steps?

For DeepCache at several refresh intervals and depths, T-Stitch with the quarter-width
``digits_small`` model on the early steps, and int8 (linear layers dynamically, convolutions with
one calibrated range per layer or per time interval), all at 20 steps of the pipeline's sampler,
and for the plain sampler at 20 steps and fewer, on the same seeds and classes: network FLOPs per
image (PyTorch's counter; int8 rows count their integer products as the float ones they replace),
wall time per image (one thread, configurations interleaved, median of rounds), FD against the
digits test split (digits-classifier features), the classifier's accuracy on the requested class,
and the weight bytes int8 holds. Each accelerated row is set beside the plain row of nearest FLOPs.

    difflab train digits; difflab train digits_small
    python bench/accel.py --pipeline outputs/digits/final --small outputs/digits_small/final

Run by hand, alone on the machine. Writes bench/results/accel.{json,md,png}.
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
PLAIN = [20, 14, 10, 8, 6]
CACHES = [("DeepCache N=2 depth 1", {"name": "deep_cache", "interval": 2, "depth": 1}),
          ("DeepCache N=3 depth 1", {"name": "deep_cache", "interval": 3, "depth": 1}),
          ("DeepCache N=5 depth 1", {"name": "deep_cache", "interval": 5, "depth": 1}),
          ("DeepCache N=3 depth 2", {"name": "deep_cache", "interval": 3, "depth": 2})]
SWITCHES = [0.8, 0.6, 0.4]  # T-Stitch: the small network for t > switch (on the trailing grid: 20-60 % of the steps)


def configs(unet: bool, small: Pipeline | None, one_range: dict, blocks: list[str],
            guided: bool) -> list[tuple[str, int, dict | None]]:
    rows: list[tuple[str, int, dict | None]] = [(f"{steps} steps", steps, None) for steps in PLAIN]
    if unet:
        rows += [(f"{name}, 20 steps", 20, acc) for name, acc in CACHES]
    else:  # a transformer: FORA-style residual reuse of the inner blocks, and attention reuse
        rows += [(f"block cache (inner {len(blocks)} blocks) refresh {n}, 20 steps", 20,
                  {"name": "block_cache", "blocks": blocks, "refresh": n, "reuse": "residual"}) for n in (2, 3)]
        rows += [(f"attention reuse refresh {n}, 20 steps", 20, {"name": "attention_reuse", "refresh": n})
                 for n in (2, 3)]
        if guided:
            rows += [("attention shared across CFG branches, 20 steps", 20,
                      {"name": "attention_reuse", "refresh": 1, "share_branches": True}),
                     ("attention shared across branches, refresh 2, 20 steps", 20,
                      {"name": "attention_reuse", "refresh": 2, "share_branches": True})]
    if small:
        rows += [(f"T-Stitch, small net for t > {sw}, 20 steps", 20, {"name": "t_stitch", "small": small, "switch": sw})
                 for sw in SWITCHES]
    rows += [("int8 linear layers, 20 steps", 20, {"name": "int8"})]
    if unet:
        rows += [("int8 convolutions, one range per layer, 20 steps", 20,
                  {"name": "int8", "linear": False, "calibration": one_range}),
                 ("int8 convolutions, 8 time intervals, 20 steps", 20,
                  {"name": "int8", "linear": False, "convs": True}),
                 ("int8 linear + convolutions (8 intervals), 20 steps", 20, {"name": "int8", "convs": True})]
    return rows


def recorded(acc: dict | None) -> dict | None:
    """The accelerator as the JSON records it (a calibration by its size, not its numbers)."""
    if acc is None:
        return None
    return {k: (f"{len(v['ranges'])} layers x {v['intervals']} interval(s)" if k == "calibration" else
                "the --small pipeline" if k == "small" else v) for k, v in acc.items()}


def plot(rows: dict[str, dict], path: Path) -> None:
    """FD against network FLOPs and against wall time: the plain sampler's line, each method's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    families = {"DeepCache": "s", "block cache": "s", "attention": "v", "T-Stitch": "^", "int8": "D"}
    for ax, key, xlabel in ((axes[0], "gflops_per_image", "network GFLOP per image"),
                            (axes[1], "ms_per_image", "ms per image (one thread)")):
        plain = sorted((r[key], r["fd"], r["steps"]) for r in rows.values() if r["accelerator"] is None)
        ax.plot([p[0] for p in plain], [p[1] for p in plain], "ko-", label="plain sampler, fewer steps")
        for x, y, steps in plain:
            ax.annotate(f"{steps}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for family, marker in families.items():
            points = [(r[key], r["fd"]) for name, r in rows.items() if name.startswith(family)]
            if points:
                ax.plot(*zip(*points, strict=True), marker, ls="none", label=family)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FD (digits features, lower is better)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default="outputs/digits/final")
    parser.add_argument("--small", default=None, help="the digits_small pipeline for T-Stitch (rows left out without)")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cfg", type=float, default=None, help="sample every row with CFG at this scale")
    parser.add_argument("--name", default="accel", help="the results' file name (accel_dit for the transformer)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(args.pipeline)
    if args.cfg is not None:
        pipe.guidance = {"method": "cfg", "options": {"scale": args.cfg}}
    unet = "mid" in pipe.network.block_names()
    start = time.perf_counter()
    one_range = dict(pipe.calibrate_int8(n=64, intervals=1)) if unet else {}
    if unet:
        pipe.calibrate_int8(n=64, intervals=8)
    calibration_seconds = (time.perf_counter() - start) / 2
    test = Digits("test").x
    classifier, classifier_acc = load_classifier("digits")
    labels = torch.arange(args.n) % 10
    rows: dict[str, dict] = {}
    small = Pipeline.from_pretrained(args.small) if args.small else None  # opened once, not in every timed call
    plan = configs(unet, small, one_range, pipe.network.block_names()[1:-1], args.cfg is not None)
    for name, steps, acc in plan:
        _, flops = accel.count_flops(lambda steps=steps, acc=acc: pipe(seeds=range(10), class_labels=labels[:10],
                                                                       steps=steps, accelerator=acc))
        if acc is not None and acc["name"] == "int8":  # the integer products are not in torch's float count
            _, flops = accel.count_flops(lambda steps=steps: pipe(seeds=range(10), class_labels=labels[:10],
                                                                  steps=steps))
        out = pipe(seeds=range(args.n), class_labels=labels, steps=steps, batch_size=500, accelerator=acc)
        result = metrics.compare(test, out.images, ("fd",), features="digits")
        if acc is None and steps == PLAIN[0]:
            reference = out.images  # the first row: the plain 20 steps
        rows[name] = {"steps": steps, "accelerator": recorded(acc), "gflops_per_image": flops / 10 / 1e9,
                      "image_rmse_vs_20_steps": float((out.images - reference).pow(2).mean().sqrt()),
                      "fd": result["fd"]["value"], "fd_ci": result["fd"]["ci"],
                      "accuracy": accuracy(classifier, out.images, labels), "seconds": []}
        if acc is not None and acc["name"] == "int8":
            options = pipe._int8_options(acc)
            with accel.int8(pipe.denoiser(), options.get("calibration"), options.get("linear", True)) as q:
                rows[name]["weight_bytes"] = {"float32": q.report["float_bytes"], "int8": q.report["int8_bytes"]}
        print(f"{name:55s} {rows[name]['gflops_per_image']:.4f} GFLOP  FD {result['fd']['value']:.3f}"
              f"  acc {rows[name]['accuracy']:.3f}", flush=True)
    for _ in range(args.rounds):  # wall time, configurations interleaved
        for name, steps, acc in plan:
            start = time.perf_counter()
            pipe(seeds=range(500), class_labels=labels[:500], steps=steps, batch_size=500, accelerator=acc)
            rows[name]["seconds"].append(time.perf_counter() - start)
    base = rows[plan[0][0]]
    for row in rows.values():
        row["ms_per_image"] = 1000 * sorted(row["seconds"])[len(row["seconds"]) // 2] / 500
        row["speedup_vs_20_steps"] = base["ms_per_image"] / row["ms_per_image"]
        row["flops_ratio_vs_20_steps"] = base["gflops_per_image"] / row["gflops_per_image"]
    plain = {k: r for k, r in rows.items() if r["accelerator"] is None}
    for row in rows.values():
        if row["accelerator"] is not None:
            row["equal_flops_baseline"] = min(plain, key=lambda k: abs(plain[k]["gflops_per_image"]
                                                                          - row["gflops_per_image"]))
    network_bytes = sum(p.numel() * p.element_size() for p in pipe.network.parameters())
    meta = {"pipeline": args.pipeline, "network": "unet" if unet else "dit", "cfg": args.cfg, "small": args.small,
            "n_samples": args.n, "sampler": pipe.sampler,
            "schedule": pipe.schedule, "threads": 1, "reference": "digits test split", "features": "digits classifier",
            "torch": torch.__version__, "classifier_test_accuracy": classifier_acc, "network_bytes": network_bytes,
            "int8_calibration": "64 images, 20 steps, the pipeline's sampling",
            "int8_calibration_seconds": calibration_seconds,
            "timing": f"median of {args.rounds} interleaved rounds, 500 images"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| configuration | GFLOP / image | FLOPs saved | ms / image | speed-up | FD | accuracy | image RMSE "
             "to 20 steps | plain sampler at equal FLOPs |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        same = r.get("equal_flops_baseline")
        other = f"{same}: FD {rows[same]['fd']:.2f}, {100 * rows[same]['accuracy']:.1f} %" if same else ""
        lines.append(f"| {name} | {r['gflops_per_image']:.4f} | {r['flops_ratio_vs_20_steps']:.2f}x | "
                     f"{r['ms_per_image']:.2f} | {r['speedup_vs_20_steps']:.2f}x | {r['fd']:.2f} | "
                     f"{100 * r['accuracy']:.1f} % | {r['image_rmse_vs_20_steps']:.4f} | {other} |")
    sizes = [f"| {name} | {r['weight_bytes']['float32'] / 1e6:.3f} MB | {r['weight_bytes']['int8'] / 1e6:.3f} MB |"
             for name, r in rows.items() if "weight_bytes" in r]
    network = "U-Net" if unet else "DiT"
    guided = f", CFG {args.cfg}" if args.cfg is not None else ""
    command = (f"python bench/accel.py --pipeline {args.pipeline}" + (f" --small {args.small}" if args.small else "")
               + (f" --cfg {args.cfg}" if guided else "") + f" --name {args.name}")
    text = (f"# Training-free acceleration on the digits {network}\n\n`{command}` (n = {args.n}, {pipe.sampler} on "
            f"{pipe.schedule}{guided}, classes cycled, the same seeds in every row; FD on digits-classifier features "
            f"against the {len(test)}-image test split; image RMSE to the plain 20-step images from the same seeds; "
            f"wall time one thread, {meta['timing']}).\n\n"
            + "\n".join(lines) + "\n")
    if sizes:
        calibrated = f"; calibration {calibration_seconds:.1f} s for 64 images" if unet else ""
        text += (f"\nint8 weights (the network holds {network_bytes / 1e6:.3f} MB in float32{calibrated}):\n\n"
                 "| configuration | quantized layers in float32 | "
                 "in int8 |\n|---|---|---|\n" + "\n".join(sizes) + "\n")
    (RESULTS / f"{args.name}.md").write_text(text)
    plot(rows, RESULTS / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()
