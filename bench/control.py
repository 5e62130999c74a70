"""Control and adapters measured on scenes, whose control maps are exact.

* ``train``: a ControlNet (Zhang et al. 2023) for the scenes text-to-image base (``scenes_t2i``
  recipe) on the training scenes' colour segmentation (4 channels) or edge map (1 channel).
* ``train --plus``: ControlNet++ (Li et al. 2024) from that ControlNet: a small segmenter trained on
  scenes gives the cycle-consistency reward of lightly noised, one-step-denoised training images.
* ``control``: held-out scenes sampled from their captions alone (the uncontrolled base) and under
  segmentation, edge and both controls at a sweep of conditioning scales: mIoU of the generated
  images' exact colour segmentation against the input map, edge F1 (1-pixel tolerance), FD on
  8x8-pooled pixels against the held-out images, prompt accuracy (the set of colours seen is the
  caption's), network evaluations per image. The VAE's own round trip is the ceiling.
* ``lora``: a new concept ("a zorbly": one two-shape subject the base never saw, 12 photos) learned
  by a LoRA and by a full fine-tune in the same wall time: the concept's mIoU against its exact map,
  the prompt accuracy of ordinary held-out captions (what the model forgets), trainable
  parameters; runtime vs merged outputs. (A new colour cannot be a concept here: the frozen VAE,
  trained on the four colours, does not reconstruct magenta at all.)

Run by hand, alone: python bench/control.py train --kind segmentation   (and edges; may run side by side)
                    python bench/control.py measure [--only control,lora]
Writes bench/results/control.json, control.md and control.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.adapters import Control, ControlNet, merge
from difflab.data import Scenes
from difflab.data.scenes import render
from difflab.data.shapes import COLOURS
from difflab.metrics import frechet_distance
from difflab.metrics.control import edge_f1, edges, mean_iou, segment
from difflab.pipeline import Pipeline, weights_digest

RESULTS = Path(__file__).parent / "results"
CHANNELS = {"segmentation": 4, "edges": 1}


def pooled(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images.float(), 4).flatten(1)


def held_out(n: int) -> dict[str, torch.Tensor | list[str]]:
    data = Scenes(n=n, seed=1)
    items = [data[i] for i in range(n)]
    return {"x": torch.stack([it["x"] for it in items]), "captions": [it["caption"] for it in items],
            "classes": torch.stack([it["classes"] for it in items]),
            "segmentation": torch.stack([it["segmentation"] for it in items]),
            "edges": torch.stack([it["edges"] for it in items])}


def colour_sets(classes: torch.Tensor, min_pixels: int = 6) -> list[set[int]]:
    return [{c for c in range(1, 1 + len(COLOURS)) if int((m == c).sum()) >= min_pixels} for m in classes]


def prompt_accuracy(images: torch.Tensor, captions: list[str]) -> float:
    names = list(COLOURS)
    wanted = [{names.index(c) + 1 for c in names if c in cap} for cap in captions]
    seen = colour_sets(segment(images))
    return sum(w == s for w, s in zip(wanted, seen, strict=True)) / len(captions)


def scores(images: torch.Tensor, ref: dict) -> dict[str, float]:
    return {"miou": mean_iou(segment(images), ref["classes"])["miou"],
            "edge_f1": edge_f1(edges(images), ref["edges"])["f1"],
            "fd": float(frechet_distance(pooled(ref["x"]), pooled(images), bootstrap=0)["value"])
            if len(images) > 16 else float("nan"),  # (the picture-only run has 8)
            "prompt_accuracy": prompt_accuracy(images, ref["captions"])}


def train(args) -> None:
    from difflab.metrics.control import train_segmenter
    from difflab.training.adapters import train_controlnet, train_controlnet_reward

    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(args.base)
    data = Scenes(n=8192, seed=0)
    items = [data[i] for i in range(len(data))]
    images = torch.stack([it["x"] for it in items])
    controls = torch.stack([it[args.kind] for it in items])
    captions = [it["caption"] for it in items]
    log: list = []
    record: dict = {"lr": args.lr, "batch_size": args.batch_size}
    work = Path(args.work)
    if args.plus:  # ControlNet++ from the trained ControlNet of this kind
        start = work / f"controlnet_{args.kind}"
        cn = ControlNet.from_pretrained(start, pipe.network, base_identity=pipe.identity())
        t0 = time.perf_counter()
        segmenter = train_segmenter(images, torch.stack([it["classes"] for it in items]))
        record["segmenter_seconds"] = time.perf_counter() - t0
        check = held_out(256)
        with torch.no_grad():
            record["segmenter_pixel_accuracy"] = float((segmenter(check["x"]).argmax(1) == check["classes"])
                                                       .float().mean())
        consistency: list = []
        cn = train_controlnet_reward(pipe, cn, images, captions, controls, torch.stack([it["classes"] for it in items]),
                                     segmenter, steps=args.steps, batch_size=args.batch_size, lr=args.lr, log=log,
                                     consistency_log=consistency, reward_weight=args.reward_weight, t_max=args.t_max)
        previous = json.loads((start / "training.json").read_text())
        record.update(steps=previous["steps"] + args.steps, plus_steps=args.steps, reward_weight=args.reward_weight,
                      t_max=args.t_max,
                      consistency_first=sum(consistency[:20]) / 20, consistency_last=sum(consistency[-20:]) / 20)
        out = work / f"controlnet_{args.kind}_plus"
    else:
        cn = train_controlnet(pipe, images, captions, controls, steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, log=log)
        record["steps"] = args.steps
        out = work / f"controlnet_{args.kind}"
    record["seconds"] = log[-1]["seconds"]  # the steps alone (encoding the captions once comes before)
    if args.plus:
        record["seconds"] += previous["seconds"]
    record["final_loss"] = sum(r["loss"] for r in log[-50:]) / len(log[-50:])
    cn.save_pretrained(out, base_identity=pipe.identity())
    (out / "training.json").write_text(json.dumps(record))
    print(f"trained {out.name} in {record['seconds']:.0f} s -> {out}: {record}")


def bench_control(pipe: Pipeline, work: Path, n: int, scales: list[float]) -> dict:
    ref = held_out(n)
    rows = []
    if pipe.vae is not None:
        with torch.no_grad():
            round_trip = pipe.vae.from_latent(pipe.vae.to_latent(ref["x"])).clamp(-1, 1)
        rows.append({"method": "VAE round trip (ceiling)", "scale": None, **scores(round_trip, ref), "nfe": 0})
    common = {"prompts": ref["captions"], "seed": 0, "batch_size": 64}
    t0 = time.perf_counter()
    base = pipe(n, **common)
    rows.append({"method": "text only (uncontrolled base)", "scale": None, **scores(base.images, ref),
                 "nfe": base.settings[0]["denoiser_calls"], "seconds": time.perf_counter() - t0})
    nets = {}
    for kind in (*CHANNELS, "segmentation_plus"):
        folder = work / f"controlnet_{kind}"
        if (folder / "controlnet.json").is_file():
            nets[kind] = ControlNet.from_pretrained(folder, pipe.network, base_identity=pipe.identity())
            nets[kind].training_record = json.loads((folder / "training.json").read_text())
    images = {}
    for kind, cn in nets.items():
        for scale in scales:
            t0 = time.perf_counter()
            out = pipe(n, **common, controls=Control(cn, ref[kind.removesuffix("_plus")], scale))
            name = "ControlNet++ segmentation" if kind.endswith("_plus") else f"ControlNet {kind}"
            rows.append({"method": name, "scale": scale, **scores(out.images, ref),
                         "nfe": out.settings[0]["denoiser_calls"], "seconds": time.perf_counter() - t0,
                         "training_steps": cn.training_record["steps"],
                         "training_seconds": cn.training_record["seconds"]})
            images[(kind, scale)] = out.images
            print(rows[-1])
    if "segmentation" in nets and "edges" in nets:
        for scale in scales:
            out = pipe(n, **common, controls=[Control(nets["segmentation"], ref["segmentation"], scale),
                                             Control(nets["edges"], ref["edges"], scale)])
            rows.append({"method": "multi-ControlNet segmentation + edges", "scale": scale,
                         **scores(out.images, ref), "nfe": out.settings[0]["denoiser_calls"]})
            images[("multi", scale)] = out.images
            print(rows[-1])
    picture(ref, base.images, images, RESULTS / "control.png")  # rows: see table()
    return {"n": n, "rows": rows}


def picture(ref, base, images, path: Path) -> None:
    from difflab.metrics.control import palette
    from difflab.plotting import image_grid

    k = 8
    seg_map = palette()[ref["classes"][:k]].permute(0, 3, 1, 2)  # the segmentation control in its colours
    columns = [ref["x"][:k], seg_map, ref["edges"][:k].repeat(1, 3, 1, 1) * 2 - 1, base[:k]]
    for key in (("segmentation", 1.0), ("segmentation_plus", 1.0), ("edges", 1.0), ("multi", 1.0)):
        if key in images:
            columns.append(images[key][:k])
    image_grid(torch.cat(columns), nrow=k, scale=4).save(path)


# --- LoRA: a new concept -------------------------------------------------------------------------------
#: a subject the base never saw, under a new word (DreamBooth's setting): this exact layout of two shapes
CONCEPT = [{"shape": "circle", "colour": "red", "radius": 0.2, "x": 0.3, "y": 0.3, "angle": 0.0},
           {"shape": "square", "colour": "blue", "radius": 0.18, "x": 0.7, "y": 0.68, "angle": 0.4}]
CONCEPT_PROMPT = "a zorbly"


def concept_images(n: int, seed: int, jitter: float = 0.03) -> tuple[torch.Tensor, list[str]]:
    """``n`` photos of the concept, each a little moved (as photos of one subject differ)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        objects = [{**o, "x": o["x"] + float(rng.uniform(-jitter, jitter)),
                    "y": o["y"] + float(rng.uniform(-jitter, jitter))} for o in CONCEPT]
        images.append(torch.from_numpy(render(objects, 32)["image"].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(images), [CONCEPT_PROMPT] * n


def bench_lora(pipe: Pipeline, seconds: float, n_eval: int) -> dict:
    from difflab.plotting import image_grid
    from difflab.training.adapters import finetune, train_lora

    images, captions = concept_images(12, seed=0)
    truth = torch.from_numpy(render(CONCEPT, 32)["classes"])[None].expand(n_eval, -1, -1)
    others = held_out(n_eval)

    def quality(p, loras=None):
        concept = p(n_eval, prompts=CONCEPT_PROMPT, seed=100, loras=loras).images
        kept = p(n_eval, prompts=others["captions"], seed=200, loras=loras).images
        return {"concept_miou": mean_iou(segment(concept), truth)["miou"],
                "other_prompts_accuracy": prompt_accuracy(kept, others["captions"])}

    rows = [{"method": "base (never saw the concept)", **quality(pipe), "trainable": 0}]
    variants = {"LoRA rank 4, attention, lr 1e-3": (("*.to_q", "*.to_k", "*.to_v", "*.to_out"), 1e-3),
                "LoRA rank 4, attention + 2nd conv of each res block, lr 2e-3":
                    (("*.to_q", "*.to_k", "*.to_v", "*.to_out", "*.conv2"), 2e-3)}
    loras = {}
    for name, (targets, lr) in variants.items():
        log: list = []
        loras[name] = train_lora(pipe, images, captions, rank=4, targets=targets, steps=100000, batch_size=12, lr=lr,
                                 max_seconds=seconds, log=log)
        rows.append({"method": name, **quality(pipe, [(loras[name], 1.0)]),
                     "trainable": sum(p.numel() for p in loras[name].parameters()), "steps": len(log),
                     "seconds": log[-1]["seconds"]})
    lora = loras[max((r for r in rows[1:]), key=lambda r: r["concept_miou"])["method"]]
    log = []
    tuned = finetune(pipe, images, captions, steps=100000, batch_size=12, lr=1e-4, max_seconds=seconds, log=log)
    rows.append({"method": "full fine-tune", **quality(tuned), "trainable": tuned.network.num_parameters(),
                 "steps": len(log), "seconds": log[-1]["seconds"]})
    total = pipe.network.num_parameters()
    for r in rows:
        r["trainable_share"] = r["trainable"] / total
    full, best = rows[-1]["concept_miou"], max(r["concept_miou"] for r in rows[1:-1])
    share = best / full if full > 0 else float("nan")
    before = weights_digest(pipe.network)
    with torch.no_grad():
        runtime = pipe(8, prompts=CONCEPT_PROMPT, seed=0, loras=[(lora, 1.0)]).images
        with merge(pipe.network, [(lora, 1.0)]):
            merged = pipe(8, prompts=CONCEPT_PROMPT, seed=0).images
        grid = [images[:8], pipe(8, prompts=CONCEPT_PROMPT, seed=0).images, runtime,
                tuned(8, prompts=CONCEPT_PROMPT, seed=0).images]
    image_grid(torch.cat(grid), nrow=8, scale=4).save(RESULTS / "control_lora.png")
    return {"rows": rows, "lora_quality_share_of_full": share,
            "runtime_vs_merged_max_abs": float((runtime - merged).abs().max()),
            "weights_restored": before == weights_digest(pipe.network), "seconds_each": seconds}


def table(results: dict) -> str:
    lines = ["# Control and adapters on scenes", ""]
    if "control" in results:
        c = results["control"]
        lines += [f"Held-out scenes: {c['n']}, sampled from their captions (CFG 3, dpmpp_2m, 20 steps).", "",
                  "`control.png`, rows: held-out scene, its segmentation and edge maps, text only, ControlNet "
                  "segmentation, ControlNet++ segmentation, ControlNet edges, both (scale 1).", "",
                  "| method | scale | mIoU | edge F1 | FD (8x8 pixels) | prompt accuracy | NFE / image | "
                  "training |", "|---|---|---|---|---|---|---|---|"]
        for r in c["rows"]:
            train_ = f"{r['training_steps']} steps, {r['training_seconds'] / 60:.0f} min" if "training_steps" in r \
                else ""
            scale = "" if r["scale"] is None else f"{r['scale']:g}"
            lines.append(f"| {r['method']} | {scale} | {r['miou']:.3f} | {r['edge_f1']:.3f} | {r['fd']:.3f} | "
                         f"{r['prompt_accuracy']:.0%} | {r['nfe']} | {train_} |")
    if "lora" in results:
        lo = results["lora"]
        lines += ["", f"New concept ('{CONCEPT_PROMPT}': one two-shape subject, 12 photos), "
                      f"{lo['seconds_each']:.0f} s of training each:", "",
                  "| method | concept mIoU | other prompts' accuracy | trainable parameters | steps |",
                  "|---|---|---|---|---|"]
        for r in lo["rows"]:
            lines.append(f"| {r['method']} | {r['concept_miou']:.3f} | {r['other_prompts_accuracy']:.0%} | "
                         f"{r['trainable']} ({r['trainable_share']:.2%}) | {r.get('steps', '')} |")
        lines += ["", f"The best LoRA's concept mIoU as a share of the full fine-tune's: "
                      f"{lo['lora_quality_share_of_full']:.0%}."]
        lines += ["", f"Runtime LoRA vs merged weights: max |difference| {lo['runtime_vs_merged_max_abs']:.2e}; "
                      f"weights restored bit for bit: {lo['weights_restored']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("train", "measure"))
    parser.add_argument("--base", default="outputs/scenes_t2i/final")
    parser.add_argument("--work", default="outputs/control")
    parser.add_argument("--kind", choices=tuple(CHANNELS), default="segmentation")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--plus", action="store_true", help="ControlNet++: fine-tune the trained ControlNet")
    parser.add_argument("--reward-weight", type=float, default=0.5, help="ControlNet++'s consistency weight")
    parser.add_argument("--t-max", type=float, default=0.25, help="ControlNet++: the most noise of its reward step")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--scales", default="0.5,1,1.5")
    parser.add_argument("--lora-seconds", type=float, default=300)
    parser.add_argument("--lora-n", type=int, default=48, help="images per LoRA quality measure")
    parser.add_argument("--only", default="control,lora")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of measure (alone on the machine)")
    args = parser.parse_args()
    if args.command == "train":
        return train(args)
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.base)
    path = RESULTS / "control.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    parts = args.only.split(",")
    if "control" in parts:
        results["control"] = bench_control(pipe, Path(args.work), args.n, [float(s) for s in args.scales.split(",")])
    if "picture" in parts and "control" not in parts:  # the picture alone, from the same seeds and prompts
        bench_control(pipe, Path(args.work), 8, [1.0])
    if "lora" in parts:
        results["lora"] = bench_lora(pipe, args.lora_seconds, args.lora_n)
    path.write_text(json.dumps(results, indent=1))
    (RESULTS / "control.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
