"""Guidance methods on the shapes text-to-image model: prompt accuracy vs FD vs network evaluations.

For every caption the shapes data can have (96; 16 of them name a (shape, colour) pair held out of
training) and ``--per-prompt`` seeds, each guidance method at a small sweep of scales: prompt accuracy
(all four attributes right; and per attribute; and on the held-out prompts), Frechet distance with
shapes-classifier features against real shapes images, and network evaluations per image (counted
at the network: CFG costs two per step, PAG with CFG three, interval guidance fewer).

Autoguidance's weak model is the same network earlier in training (``--weak``, a checkpoint).

Run by hand, alone on the machine:
  python bench/guidance.py --pipeline outputs/shapes_t2i/final --weak outputs/shapes_t2i/checkpoints/step_00001000
Writes bench/results/guidance.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from difflab import metrics
from difflab.data.shapes import all_captions, parse_caption
from difflab.metrics.prompt_accuracy import prompt_accuracy
from difflab.metrics.reference import load_reference
from difflab.pipeline import Pipeline
from difflab.training.export import export

RESULTS = Path(__file__).parent / "results"
INTERVAL = [0.28, 5.42]  # EDM noise levels sigma / alpha of Kynkaanniemi et al. 2024 (EDM2, ImageNet-512)


def methods(weak: bool) -> list[tuple[str, str, dict]]:
    rows = [("none", "none", {})]
    rows += [(f"cfg {s}", "cfg", {"scale": s}) for s in (2.0, 4.0, 7.0)]
    rows += [("cfg 7 rescale 0.7", "cfg", {"scale": 7.0, "rescale": 0.7})]
    rows += [(f"cfg {s} interval", "cfg", {"scale": s, "interval": INTERVAL}) for s in (4.0, 7.0)]
    rows += [(f"apg {s}", "apg", {"scale": s, "eta": 0.0}) for s in (4.0, 7.0)]
    rows += [(f"icg {s}", "icg", {"scale": s}) for s in (2.0, 4.0)]
    rows += [(f"pag {s}", "pag", {"scale": s}) for s in (1.0, 3.0)]
    rows += [("pag 2 + cfg 4", "pag", {"scale": 2.0, "cfg_scale": 4.0})]
    if weak:
        rows += [(f"autoguidance {s}", "autoguidance", {"scale": s}) for s in (2.0, 3.0)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default="outputs/shapes_t2i/final")
    parser.add_argument("--weak", help="checkpoint of the weaker model for autoguidance")
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--holdout", default="triangle:blue,circle:yellow", help="(shape:colour) pairs held out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.pipeline)
    weak = None
    if args.weak:
        weak = export(args.weak).denoiser()
    held = {tuple(p.split(":")) for p in args.holdout.split(",") if p}
    prompts = [c for c in all_captions() for _ in range(args.per_prompt)]
    unseen = [(a["shape"], a["colour"]) in held for a in map(parse_caption, prompts)]
    reference = load_reference("shapes", n=2000)
    rows_seen = 0

    def count(module, inputs, output):
        nonlocal rows_seen
        rows_seen += inputs[0].shape[0]

    hooks = [net.register_forward_hook(count) for net in (pipe.network, getattr(weak, "net", None)) if net is not None]
    floor = metrics.compare(reference, _real_for(prompts), ("fd",), features="shapes")["fd"]
    print(f"real vs real FD {floor['value']:.2f}", flush=True)
    rows = []
    for label, method, options in methods(weak is not None):
        if method == "autoguidance":
            options = {**options, "weak": weak}
        rows_seen = 0
        start = time.time()
        out = pipe(seeds=range(len(prompts)), prompts=prompts, steps=args.steps, guidance=method,
                   guidance_options=options, batch_size=128)
        acc = prompt_accuracy(out.images, prompts, groups={"unseen": unseen, "seen": [not u for u in unseen]})
        fd = metrics.compare(reference, out.images, ("fd",), features="shapes")["fd"]
        row = {"method": label, "guidance": method, "options": {k: v for k, v in options.items() if k != "weak"},
               "accuracy": acc, "fd": fd, "nfe_per_image": rows_seen / len(prompts),
               "seconds": round(time.time() - start, 1)}
        rows.append(row)
        print(f"{label:22s} acc {acc['accuracy']:.3f} (unseen {acc['unseen']['accuracy']:.3f})  FD {fd['value']:.2f}  "
              f"NFE {row['nfe_per_image']:.0f}", flush=True)
    for hook in hooks:
        hook.remove()
    meta = {"real_vs_real_fd": floor,
            "pipeline": args.pipeline, "weak": args.weak, "prompts": len(set(prompts)), "per_prompt": args.per_prompt,
            "steps": args.steps, "sampler": pipe.sampler, "interval": INTERVAL, "threads": args.threads,
            "holdout": sorted(held), "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "guidance.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "guidance.md").write_text(markdown(rows, meta))
    plot(rows, RESULTS / "guidance.png")
    print(markdown(rows, meta))


def _real_for(prompts: list[str], seed: int = 4242) -> torch.Tensor:
    """Real images drawn for exactly these prompts (random placement jitter): the FD floor for a set
    with the generated images' attribute proportions (the reference's are random, so a set of other
    random real images sits much further from it than a balanced one)."""
    import numpy as np

    from difflab.data.shapes import draw

    rng = np.random.default_rng(seed)
    images = []
    for p in prompts:
        a = parse_caption(p)
        image, _ = draw(a["shape"], a["colour"], a["size"], a["position"], 32,
                        (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))))
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(images)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Guidance on the shapes text-to-image model",
        "",
        f"`python bench/guidance.py` — {meta['prompts']} prompts x {meta['per_prompt']} seeds, {meta['sampler']} "
        f"{meta['steps']} steps. Accuracy: all four attributes right (difflab's shapes classifier); unseen: the "
        f"prompts whose (shape, colour) pair was held out of training ({', '.join(map(str, meta['holdout']))}). "
        "FD: shapes-classifier features against 2000 real images; the floor, real images drawn for the same "
        f"prompts against them, is {meta['real_vs_real_fd']['value']:.2f} "
        f"[{meta['real_vs_real_fd']['ci'][0]:.2f}, {meta['real_vs_real_fd']['ci'][1]:.2f}]. FD on these "
        "features is noisy (clustered, heavy-tailed activations): compare rows, not digits. NFE: network "
        "evaluations per image "
        "(counted at the networks, the weak one included).",
        "",
        "| method | accuracy | unseen | shape | colour | size | position | FD [95% CI] | NFE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, fd = r["accuracy"], r["fd"]
        lines.append(f"| {r['method']} | {a['accuracy']:.3f} | {a['unseen']['accuracy']:.3f} | {a['shape']:.3f} | "
                     f"{a['colour']:.3f} | {a['size']:.3f} | {a['position']:.3f} | {fd['value']:.2f} "
                     f"[{fd['ci'][0]:.2f}, {fd['ci'][1]:.2f}] | {r['nfe_per_image']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["guidance"], []).append(r)
    for method, rs in by_method.items():
        ax.plot([r["fd"]["value"] for r in rs], [r["accuracy"]["accuracy"] for r in rs], "o-", label=method)
        for r in rs:
            ax.annotate(r["method"].removeprefix(method).strip() or method, (r["fd"]["value"],
                        r["accuracy"]["accuracy"]), fontsize=7)
    ax.set_xlabel("FD to real shapes (shapes-classifier features), lower is better")
    ax.set_ylabel("prompt accuracy (all attributes)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
