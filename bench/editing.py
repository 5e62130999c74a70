"""Editing measured against exact answers: inversion round trips, inpainting, SDEdit and prompt edits.

* ``inversion`` (analytic d = 64 class-conditional mixture, exact denoiser): reconstruction PSNR
  and max error of invert -> sample for every deterministic sampler x prediction (eps, x0, v on
  SD's discrete VP; flow velocity on rectified flow) x NFE (10, 20, 50), at guidance 1 and 5
  (classifier-free, the mixture's own unconditional branch), plus EDICT and BDIA, in float32 and
  float64.
* ``digits`` (the trained digits pipeline, ``make demo``): the same round trips on real test
  digits, null-text inversion at guidance 5 beside the guidance-1 round trip; inpainting of the
  right half (training-free, with and without RePaint resampling, and the trained inpainting model
  of the ``digits_inpaint`` recipe): kept pixels' max change, FD of the inpainted images, the
  classifier's accuracy on the original digit and a seam score (mean jump across the mask border
  divided by the real images' own).
* ``shapes`` (a trained shapes text-to-image pipeline, ``--shapes``): colour and shape edits of
  generated images by prompt-to-prompt, by inversion + the new prompt and by SDEdit at several
  strengths, beside simply sampling the new prompt on the same seed; success = the attribute
  classifier sees the new attribute, preservation = it sees the other three unchanged.

* ``image_prompt`` (the shapes pipeline): an IP-Adapter trained here; attribute agreement between a
  reference and what it prompts, across scales, and a text prompt's accuracy beside a reference.

Run by hand, alone:  python bench/editing.py [--only inversion,digits,shapes,image_prompt]
Writes bench/results/editing.json and bench/results/editing.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from difflab import analytic, editing, guidance, metrics, processes, samplers

RESULTS = Path(__file__).parent / "results"


def psnr(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak_to_peak**2 / mse)


def round_trip(den, image, method, steps, cond, peak):
    if method in ("edict", "bdia"):
        exact = editing.EDICT() if method == "edict" else editing.BDIA()
        back = exact.sample(den, exact.invert(den, image, steps, "karras", cond=cond), cond=cond)
    else:
        back = editing.invert(den, image, method, steps, "karras", cond=cond).sample(den, cond=cond)
    return {"psnr": psnr(back, image, peak), "max_error": float((back.double() - image.double()).abs().max())}


def bench_inversion() -> list[dict]:
    mix = analytic.GaussianMixture.low_rank(dim=64, num_components=8, rank=4, num_classes=4)
    labels = torch.arange(64) % 4
    image64 = mix.sample(64, generator=torch.Generator().manual_seed(0), labels=labels)
    peak = float(image64.max() - image64.min())
    methods = [s for s in samplers.available() if samplers.deterministic(s) and s != "adaptive"] + ["edict", "bdia"]
    setups = [("vp", "eps"), ("vp", "x0"), ("vp", "v"), ("flow", "flow")]
    rows = []
    for proc_name, prediction in setups:
        process = processes.DiscreteVP.scaled_linear() if proc_name == "vp" else processes.Flow()
        plain = mix.denoiser(process, prediction)
        for scale in (1.0, 5.0):
            den = plain if scale == 1 else guidance.guide(plain, "cfg", scale=scale)
            for dtype in (torch.float32, torch.float64):
                image = image64.to(dtype)
                for method in methods:
                    for steps in (10, 20, 50):
                        r = round_trip(den, image, method, steps, {"class_labels": labels}, peak)
                        rows.append({"process": proc_name, "prediction": prediction, "guidance": scale,
                                     "dtype": str(dtype).split(".")[1], "method": method, "nfe_steps": steps, **r})
        print(f"inversion {proc_name}/{prediction} done", flush=True)
    return rows


def bench_digits(path: str, inpaint_path: str) -> dict:
    from difflab.data import Digits
    from difflab.metrics.classifiers import accuracy, load_classifier
    from difflab.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(path)
    test = Digits("test").x
    ds = Digits("test")
    n = 200
    x = torch.stack([ds[i]["x"] for i in range(n)])
    y = torch.tensor([ds[i]["label"] for i in range(n)])
    out: dict = {"inversion": {}, "inpainting": {}}
    den = pipe.denoiser()
    cond = {"class_labels": y}
    for scale in (1.0, 5.0):
        guided = den if scale == 1 else guidance.guide(den, "cfg", scale=scale)
        for method in ("ddim", "dpmpp_2m", "heun", "unipc", "edict", "bdia"):
            for steps in (10, 20, 50):
                if scale == 1 or method in ("edict", "bdia"):
                    r = round_trip(guided, x, method, steps, cond, 2.0)
                else:  # inverted at guidance 1, sampled guided
                    back = editing.invert(den, x, method, steps, "karras", cond=cond).sample(guided, cond=cond)
                    r = {"psnr": psnr(back, x, 2.0), "max_error": float((back - x).abs().max())}
                out["inversion"][f"{method} {steps} steps, guidance {scale:g}"] = r
    start = time.perf_counter()
    nt = editing.null_text_inversion(den, x, cond, scale=5.0, steps=50)
    seconds = time.perf_counter() - start
    back = nt.sample(den)
    pivot = editing.invert(den, x, "ddim", 50, "uniform", cond=cond).sample(den, cond=cond)
    out["inversion"]["ddim 50 uniform steps, guidance 1 (null-text's pivot)"] = {
        "psnr": psnr(pivot, x, 2.0), "max_error": float((pivot - x).abs().max())}
    out["inversion"]["null-text 50 steps, guidance 5"] = {"psnr": psnr(back, x, 2.0),
                                                          "max_error": float((back - x).abs().max()),
                                                          "seconds_per_200_images": seconds}
    print("digits inversion done", flush=True)
    classifier, _ = load_classifier("digits")
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1
    real_jump = seam(x, mask)
    variants = [("training-free", pipe, {}), ("RePaint U=3 jump=2", pipe, {"resample": 3, "jump": 2})]
    if Path(inpaint_path).is_dir():
        variants.append(("trained inpainting model (digits_inpaint)", Pipeline.from_pretrained(inpaint_path), {}))
    for name, model, opts in variants:
        made = model.edit(x, mask=mask, class_labels=y, steps=20, **opts).images
        keep = mask.expand_as(x) == 0
        result = metrics.compare(test, made, ("fd",), features="digits")
        out["inpainting"][name] = {"kept_max_change": float((made[keep] - x[keep]).abs().max()),
                                   "fd": result["fd"]["value"],
                                   "accuracy_on_original_digit": accuracy(classifier, made, y),
                                   "seam_ratio": seam(made, mask) / real_jump}
    for strength in (0.3, 0.5, 0.7):  # SDEdit to another digit: the new class vs closeness to the input
        target = (y + 1) % 10
        made = pipe.edit(x, strength=strength, class_labels=target, steps=20).images
        out[f"sdedit {strength}"] = {"new_digit_accuracy": accuracy(classifier, made, target),
                                     "psnr_to_input": psnr(made, x, 2.0)}
    return out


def seam(images: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute jump between the two columns on either side of a vertical mask border."""
    col = int(mask[0, 0, 0].nonzero()[0])
    return float((images[..., col] - images[..., col - 1]).abs().mean())


def bench_shapes(path: str, n: int) -> dict:
    from difflab.data.shapes import COLOURS, SHAPES, attribute_indices, caption, parse_caption
    from difflab.metrics.classifiers import attribute_hits, load_classifier
    from difflab.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(path)
    classifier, _ = load_classifier("shapes")
    g = torch.Generator().manual_seed(0)
    pairs = {"colour": [], "shape": []}
    for kind in pairs:
        for _ in range(n):
            s = SHAPES[int(torch.randint(3, (1,), generator=g))]
            c = list(COLOURS)[int(torch.randint(4, (1,), generator=g))]
            z = ("small", "large")[int(torch.randint(2, (1,), generator=g))]
            p = ("top left", "top right", "bottom left", "bottom right")[int(torch.randint(4, (1,), generator=g))]
            if kind == "colour":
                new = [o for o in COLOURS if o != c][int(torch.randint(3, (1,), generator=g))]
                pairs[kind].append((caption(s, c, z, p), caption(s, new, z, p)))
            else:
                new = [o for o in SHAPES if o != s][int(torch.randint(2, (1,), generator=g))]
                pairs[kind].append((caption(s, c, z, p), caption(new, c, z, p)))

    def score(images, targets, sources_attrs, kind, source_images):
        wanted = torch.tensor([attribute_indices(parse_caption(t)) for t in targets])
        hits = attribute_hits(classifier, images, wanted)
        column = {"shape": 0, "colour": 1}[kind]
        others = [i for i in range(4) if i != column]
        seen = torch.stack([o.argmax(1) for o in classifier.eval()(images).values()], 1)
        kept = (seen[:, others] == sources_attrs[:, others]).all(1)
        return {"success": float(hits[:, column].float().mean()), "preserved": float(kept.float().mean()),
                "both": float((hits[:, column] & kept).float().mean()),
                "layout_iou": layout_iou(images, source_images)}

    out: dict = {}
    for kind, items in pairs.items():
        sources, targets = [a for a, _ in items], [b for _, b in items]
        seeds = list(range(len(items)))
        src = pipe(seeds=seeds, prompts=sources, steps=20, sampler="ddim", schedule="uniform")
        with torch.no_grad():
            src_attrs = torch.stack([o.argmax(1) for o in classifier.eval()(src.images).values()], 1)
        res = {"source images right": float(attribute_hits(classifier, src.images, torch.tensor(
            [attribute_indices(parse_caption(p)) for p in sources])).all(1).float().mean())}
        res["new prompt, same seed"] = score(pipe(seeds=seeds, prompts=targets, steps=20, sampler="ddim",
                                                  schedule="uniform").images, targets, src_attrs, kind,
                                             src.images)
        for until in (0.2, 0.5):
            made = pipe.prompt_to_prompt(sources, targets, seeds=seeds, steps=20, sampler="ddim",
                                         schedule="uniform", cross_until=until)
            res[f"prompt-to-prompt cross_until {until}"] = score(made.images, targets, src_attrs, kind, src.images)
        words = list(COLOURS) if kind == "colour" else list(SHAPES)
        made = pipe.prompt_to_prompt(sources, targets, seeds=seeds, steps=20, sampler="ddim", schedule="uniform",
                                     cross_until=0.2, blend=words)
        res["prompt-to-prompt cross_until 0.2 + local blend"] = score(made.images, targets, src_attrs, kind, src.images)
        inv = pipe.edit(src.images, inversion="ddim", source_prompts=sources, prompts=targets, steps=20,
                        schedule="uniform")
        res["DDIM inversion + new prompt"] = score(inv.images, targets, src_attrs, kind, src.images)
        for strength in (0.5, 0.7, 0.9):
            made = pipe.edit(src.images, strength=strength, prompts=targets, steps=20, seeds=seeds)
            res[f"SDEdit {strength}"] = score(made.images, targets, src_attrs, kind, src.images)
        res.update(object_swap(pipe, classifier, kind, n, score))
        out[kind] = res
        print(f"shapes {kind} done", flush=True)
    return out


def bench_image_prompt(path: str, steps: int, n: int) -> dict:
    """Train an IP-Adapter on the shapes pipeline's own training data, then: attribute agreement
    between each reference and the image made from it with the empty prompt, across scales, and the
    prompt's accuracy when a prompt is given beside the reference."""
    from difflab.data.shapes import Shapes, attribute_indices, parse_caption
    from difflab.metrics.classifiers import attribute_hits, load_classifier
    from difflab.pipeline import Pipeline
    from difflab.training.adapters import train_image_prompt

    pipe = Pipeline.from_pretrained(path)
    train = Shapes(n=4096, resolution=32, seed=0)
    items = [train[i] for i in range(len(train))]
    start = time.perf_counter()
    adapter = train_image_prompt(pipe, torch.stack([it["x"] for it in items]), [it["caption"] for it in items],
                                 steps=steps, progress=False)
    seconds = time.perf_counter() - start
    refs_data = Shapes(n=n, resolution=32, seed=123)
    refs = [refs_data[i] for i in range(n)]
    images, attrs = torch.stack([r["x"] for r in refs]), torch.stack([r["attributes"] for r in refs])
    classifier, _ = load_classifier("shapes")
    out: dict = {"train_seconds": seconds, "train_steps": steps, "scales": {}}
    for scale in (0.0, 0.3, 0.6, 1.0):
        made = pipe(seeds=range(n), prompts=[""] * n, guidance="cfg", guidance_options={"scale": 4.0},
                    image_prompt={"adapter": adapter, "images": images, "scale": scale})
        hits = attribute_hits(classifier, made.images, attrs)
        prompts = [r["caption"] for r in refs][::-1]  # a prompt of another image beside the reference
        with_prompt = pipe(seeds=range(n), prompts=prompts, image_prompt={"adapter": adapter, "images": images,
                                                                          "scale": scale})
        wanted = torch.tensor([attribute_indices(parse_caption(p)) for p in prompts])
        out["scales"][str(scale)] = {
            "agreement_all": float(hits.all(1).float().mean()),
            **{name: float(hits[:, i].float().mean()) for i, name in enumerate(("shape", "colour", "size",
                                                                                 "position"))},
            "prompt_accuracy_with_reference": float(attribute_hits(classifier, with_prompt.images, wanted)
                                                    .all(1).float().mean())}
        print(f"image prompt scale {scale}: {out['scales'][str(scale)]}", flush=True)
    return out


def layout_iou(images: torch.Tensor, sources: torch.Tensor) -> float:
    """Mean IoU of the object's pixels (those away from the dark background) in each edited image and
    its source: how well an edit keeps where and how big the object is."""
    background = torch.tensor([20, 20, 28]).view(1, 3, 1, 1) / 127.5 - 1
    fg_a = (images.float() - background).abs().amax(1) > 0.3
    fg_b = (sources.float() - background).abs().amax(1) > 0.3
    inter, union = (fg_a & fg_b).flatten(1).sum(1), (fg_a | fg_b).flatten(1).sum(1).clamp_min(1)
    return float((inter / union).mean())


def object_swap(pipe, classifier, kind: str, n: int, score) -> dict:
    """SwapAnything-style object swap on real shapes images: inpaint the object's exact mask (grown by
    a max-pool, so a new shape fits) with the caption naming the new colour or shape."""
    from difflab.data.shapes import COLOURS, SHAPES, Shapes, caption, parse_caption

    data = Shapes(n=n, resolution=32, seed=77)
    items = [data[i] for i in range(n)]
    images = torch.stack([it["x"] for it in items])
    masks = torch.nn.functional.max_pool2d(torch.stack([it["mask"] for it in items]), 5, 1, 2)
    g = torch.Generator().manual_seed(1)
    targets = []
    for it in items:
        a = parse_caption(it["caption"])
        if kind == "colour":
            a["colour"] = [c for c in COLOURS if c != a["colour"]][int(torch.randint(3, (1,), generator=g))]
        else:
            a["shape"] = [c for c in SHAPES if c != a["shape"]][int(torch.randint(2, (1,), generator=g))]
        targets.append(caption(a["shape"], a["colour"], a["size"], a["position"]))
    attrs = torch.stack([it["attributes"] for it in items])
    made = pipe.edit(images, mask=masks, prompts=targets, steps=20)
    keep = masks.expand_as(images) == 0
    row = score(made.images, targets, attrs, kind, images)
    row["kept_pixels_max_change"] = float((made.images[keep] - images[keep]).abs().max())
    return {"object swap by inpainting the object's mask (real images)": row}


def markdown(report: dict) -> str:
    lines = ["# Editing benchmark", "", f"torch {report['meta']['torch']}, {report['meta']['threads']} thread(s).", ""]
    if "inversion" in report:
        lines += ["## Inversion round trip on the analytic mixture (PSNR dB / max error)", "",
                  "| process / prediction | guidance | dtype | method | 10 | 20 | 50 |",
                  "|---|---|---|---|---|---|---|"]
        keyed: dict = {}
        for r in report["inversion"]:
            keyed.setdefault((r["process"] + "/" + r["prediction"], r["guidance"], r["dtype"], r["method"]), {})[
                r["nfe_steps"]] = r
        for (pp, g, dt, m), by in keyed.items():
            cells = [f"{by[s]['psnr']:.1f} / {by[s]['max_error']:.0e}" for s in (10, 20, 50)]
            lines.append(f"| {pp} | {g:g} | {dt} | {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if "digits" in report:
        d = report["digits"]
        lines += ["## Trained digits model", "", "| round trip | PSNR dB | max error |", "|---|---|---|"]
        lines += [f"| {k} | {v['psnr']:.1f} | {v['max_error']:.1e} |" for k, v in d["inversion"].items()]
        lines += ["", "| inpainting (right half) | kept pixels' max change | FD | accuracy on the original digit | "
                  "seam / real |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['kept_max_change']:.0e} | {v['fd']:.2f} | {v['accuracy_on_original_digit']:.3f} | "
                  f"{v['seam_ratio']:.2f} |" for k, v in d["inpainting"].items()]
        lines += ["", "| SDEdit to the next digit | new-digit accuracy | PSNR to input |", "|---|---|---|"]
        lines += [f"| strength {k.split()[1]} | {v['new_digit_accuracy']:.3f} | {v['psnr_to_input']:.1f} |"
                  for k, v in d.items() if k.startswith("sdedit")]
        lines.append("")
    if "image_prompt" in report:
        ip = report["image_prompt"]
        threads = ip.get("train_threads", 1)
        lines += [f"## Image prompts (IP-Adapter trained {ip['train_steps']} steps, {ip['train_seconds']:.0f} s on "
                  f"{threads} thread(s))", "",
                  "| scale | reference agreement, all 4 attributes | shape | colour | size | position | "
                  "another prompt's accuracy beside the reference |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['agreement_all']:.2f} | {v['shape']:.2f} | {v['colour']:.2f} | {v['size']:.2f} | "
                  f"{v['position']:.2f} | {v['prompt_accuracy_with_reference']:.2f} |" for k, v in ip["scales"].items()]
        lines.append("")
    if "shapes" in report:
        lines += ["## Prompt edits on the shapes text-to-image model", ""]
        for kind, res in report["shapes"].items():
            lines += [f"### {kind} edits (source images fully right: {res['source images right']:.2f})", "",
                      "| method | edit success | others preserved | both | layout IoU with the source |",
                      "|---|---|---|---|---|"]
            lines += [f"| {k} | {v['success']:.2f} | {v['preserved']:.2f} | {v['both']:.2f} | {v['layout_iou']:.2f} |"
                      for k, v in res.items() if isinstance(v, dict)]
            swap = res.get("object swap by inpainting the object's mask (real images)")
            if swap:
                lines.append("\nObject swap: pixels outside the mask changed by at most "
                             f"{swap['kept_pixels_max_change']:.0e}.")
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="inversion,digits,shapes")
    parser.add_argument("--pipeline", default="outputs/demo/run/final")
    parser.add_argument("--shapes", default="outputs/shapes_t2i/final")
    parser.add_argument("--inpaint", default="outputs/digits_inpaint/final", help="the digits_inpaint recipe's run")
    parser.add_argument("--n", type=int, default=100, help="edit pairs per kind (shapes), image-prompt references")
    parser.add_argument("--ip-steps", type=int, default=5000, help="IP-Adapter training steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = args.only.split(",")
    path = RESULTS / "editing.json"
    report: dict = {}
    if "inversion" in parts:
        report["inversion"] = bench_inversion()
    if "digits" in parts:
        report["digits"] = bench_digits(args.pipeline, args.inpaint)
    if "shapes" in parts:
        report["shapes"] = bench_shapes(args.shapes, args.n)
    if "image_prompt" in parts:
        report["image_prompt"] = bench_image_prompt(args.shapes, args.ip_steps, args.n)
    RESULTS.mkdir(exist_ok=True)  # the other parts' results as they are now (parts may run side by side)
    report = {**(json.loads(path.read_text()) if path.is_file() else {}), **report,
              "meta": {"torch": torch.__version__, "threads": 1}}
    path.write_text(json.dumps(report, indent=1))
    (RESULTS / "editing.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
