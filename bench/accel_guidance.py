"""Accelerators over the guidance branches on the trained shapes text-to-image model (CFG): do the
guidance cache (FasterCache's CFG cache) and T-GATE beat taking fewer steps?

For each configuration (20 dpmpp_2m steps with the pipeline's CFG, and the plain sampler at fewer
steps), on the same seeds and every caption: network FLOPs per image (PyTorch's counter), wall time
per image (one thread, configurations interleaved, median of rounds), FD with the shapes
classifier's features against 2000 real images and prompt accuracy (every attribute right). Each
accelerated row is set beside the plain row of nearest FLOPs.

Run by hand, alone on the machine:  python bench/accel_guidance.py --pipeline runs/shapes_t2i/final
Writes bench/results/accel_guidance.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from difflab import accel, metrics
from difflab.data.shapes import all_captions
from difflab.metrics.prompt_accuracy import prompt_accuracy
from difflab.metrics.reference import load_reference
from difflab.pipeline import Pipeline

RESULTS = Path(__file__).parent / "results"
CONFIGS = [("20 steps", 20, None), ("14 steps", 14, None), ("10 steps", 10, None), ("8 steps", 8, None),
           ("guidance cache refresh 2, 20 steps", 20, {"name": "guidance_cache", "refresh": 2}),
           ("guidance cache refresh 3, 20 steps", 20, {"name": "guidance_cache", "refresh": 3}),
           ("T-GATE gate 10, 20 steps", 20, {"name": "t_gate", "gate": 10}),
           ("T-GATE gate 6, 20 steps", 20, {"name": "t_gate", "gate": 6})]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default="runs/shapes_t2i/final")
    parser.add_argument("--per-prompt", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(args.pipeline)
    reference = load_reference("shapes", n=2000)
    prompts = [c for c in all_captions() for _ in range(args.per_prompt)]
    seeds = range(10000, 10000 + len(prompts))
    rows: dict[str, dict] = {}
    for name, steps, acc in CONFIGS:
        _, flops = accel.count_flops(lambda steps=steps, acc=acc: pipe(seeds=range(4), prompts=prompts[:4],
                                                                       steps=steps, accelerator=acc))
        out = pipe(seeds=seeds, prompts=prompts, steps=steps, batch_size=96, accelerator=acc)
        result = metrics.compare(reference, out.images, features="shapes")
        rows[name] = {"steps": steps, "accelerator": acc, "gflops_per_image": flops / 4 / 1e9,
                      "fd": result["fd"]["value"], "fd_ci": result["fd"]["ci"],
                      "prompt_accuracy": prompt_accuracy(out.images, prompts)["accuracy"], "seconds": []}
        print(f"{name:38s} {rows[name]['gflops_per_image']:.3f} GFLOP  FD {rows[name]['fd']:.3f}  "
              f"prompts {rows[name]['prompt_accuracy']:.3f}", flush=True)
    timed = prompts[:: max(1, len(prompts) // 48)][:48]
    for _ in range(args.rounds):  # wall time, configurations interleaved
        for name, steps, acc in CONFIGS:
            start = time.perf_counter()
            pipe(seeds=range(len(timed)), prompts=timed, steps=steps, batch_size=len(timed), accelerator=acc)
            rows[name]["seconds"].append(time.perf_counter() - start)
    base = rows[CONFIGS[0][0]]
    for row in rows.values():
        row["ms_per_image"] = 1000 * sorted(row["seconds"])[len(row["seconds"]) // 2] / len(timed)
    for row in rows.values():
        row["speedup_vs_20_steps"] = base["ms_per_image"] / row["ms_per_image"]
        row["flops_ratio_vs_20_steps"] = base["gflops_per_image"] / row["gflops_per_image"]
    plain = {k: r for k, r in rows.items() if r["accelerator"] is None}
    for row in rows.values():
        if row["accelerator"] is not None:
            row["equal_flops_baseline"] = min(plain, key=lambda k: abs(plain[k]["gflops_per_image"]
                                                                          - row["gflops_per_image"]))
    meta = {"pipeline": args.pipeline, "n_samples": len(prompts), "seeds": f"{seeds.start}..{seeds.stop - 1}",
            "sampler": pipe.sampler, "guidance": pipe.guidance, "threads": 1, "reference": "2000 real shapes",
            "torch": torch.__version__, "timing": f"median of {args.rounds} interleaved rounds, {len(timed)} images"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "accel_guidance.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| configuration | GFLOP / image | FLOPs saved | ms / image | speed-up | FD | prompt accuracy "
             "| plain sampler at equal FLOPs |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        same = r.get("equal_flops_baseline")
        other = f"{same}: FD {rows[same]['fd']:.3f}, {100 * rows[same]['prompt_accuracy']:.1f} %" if same else ""
        lines.append(f"| {name} | {r['gflops_per_image']:.3f} | {r['flops_ratio_vs_20_steps']:.2f}x | "
                     f"{r['ms_per_image']:.1f} | {r['speedup_vs_20_steps']:.2f}x | {r['fd']:.3f} | "
                     f"{100 * r['prompt_accuracy']:.1f} % | {other} |")
    text = (f"# Guidance-branch accelerators on the shapes text-to-image model\n\n`python bench/accel_guidance.py` "
            f"({len(prompts)} images: every caption x {args.per_prompt}, seeds {meta['seeds']}; {pipe.sampler} with "
            f"the pipeline's guidance {pipe.guidance}; FD on shapes-classifier features against 2000 real shapes; "
            f"wall time one thread, {meta['timing']}).\n\n" + "\n".join(lines) + "\n")
    (RESULTS / "accel_guidance.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
