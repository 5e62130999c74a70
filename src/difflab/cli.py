"""Command line: ``difflab info | demo | train | adapt | sample | edit | eval | export``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    """Every registered part, kind by kind, with its paper (one registry type serves them all)."""
    import difflab.accel
    import difflab.data
    import difflab.guidance
    import difflab.metrics
    import difflab.metrics.features
    import difflab.models
    import difflab.models.conditioning
    import difflab.samplers
    import difflab.training.distill  # noqa: F401  (each module registers its parts on import)
    from difflab import processes, samplers
    from difflab.registry import KINDS

    for kind, registry in KINDS.items():
        print(f"[{kind}]")
        for name in registry:
            extra = ""
            if registry is samplers.base.REGISTRY:
                opts = ", ".join(f"{k}={v!r}" for k, v in samplers.get(name).options.items())
                extra = f"  [{opts}]" if opts else ""
            print(f"  {name:18s} {registry.reference(name)}{extra}")
        if registry is processes.REGISTRY:
            print("  presets: " + ", ".join(processes.PRESETS))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from difflab import demo

    if args.kind == "digits":
        metrics = demo.run_digits(args.out, overrides=args.set, steps=args.steps or 20, progress=not args.no_progress,
                                  overwrite=args.overwrite)
        print(json.dumps(metrics, indent=1))
        print(f"wrote {args.out}/samples.png and {args.out}/metrics.json")
        return 0
    metrics = demo.run_analytic(args.out, n=args.n, steps=args.steps or 10, seed=args.seed, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in metrics.items() if k != "results"}, indent=1))
    for key, row in metrics["results"].items():
        print(f"{key:36s} NFE {row['nfe']:3d}  RMSE to exact ODE {row['rmse_to_exact_ode']:.2e}  "
              f"SW to data {row['sliced_wasserstein_to_data']:.3f}")
    print(f"wrote {args.out}/samples.png and {args.out}/metrics.json")
    return 0


def _train(args: argparse.Namespace) -> int:
    from difflab.training import config as train_config
    from difflab.training.trainer import Trainer

    cfg = train_config.load(args.config, args.set)
    if cfg["distill"]["method"]:  # a student distilled from a teacher pipeline
        from difflab.training import distill

        trainer, last = distill.run(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    else:
        trainer = Trainer(cfg, overwrite=args.overwrite)
        last = trainer.run(resume=args.resume, progress=not args.no_progress)
    if trainer.rank == 0:
        out = Path(cfg["out_dir"])  # a progressive distillation's last round trains in out/round_k
        grid = trainer.sample_grid(out / "samples" / "final.png")
        print(json.dumps(last))
        print(f"wrote {out}/final (a pipeline of the EMA weights), {grid} and {trainer.out}/metrics.jsonl")
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from difflab.training import config as train_config
    from difflab.training.adapters import run_recipe

    cfg = train_config.load(args.config, args.set, kind=train_config.ADAPTER)
    out = run_recipe(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote the {cfg['kind']} for {cfg['base']} to {out}")
    return 0


def _options(items: list[str]) -> dict:
    from difflab.training.config import parse_assignment

    return dict(parse_assignment(item) for item in items)


def _accelerator(args: argparse.Namespace) -> dict | None:
    return {"name": args.accelerator, **_options(args.accelerator_option)} if args.accelerator else None


def _guidance_options(args: argparse.Namespace) -> dict:
    scale = {} if args.guidance_scale is None else {"scale": args.guidance_scale}
    return {**scale, **_options(args.guidance_option)}


SAMPLE_OUTPUTS = ("grid.png", "[0-9][0-9][0-9][0-9][0-9].png", "[0-9][0-9][0-9][0-9][0-9].json", "reproduced.*",
                  "report.json")


def _first_control(controls: list) -> list:
    """The controls of a run cut to its first image (the FLOP count samples one)."""
    return [dataclasses.replace(c, image=c.image[:1]) for c in controls or []]


def _sample(args: argparse.Namespace) -> int:
    from difflab.files import claim_output, png_bytes, read_settings, write_atomic
    from difflab.interop import open_pipeline

    pipe = open_pipeline(args.pipeline, allow_pickle=args.allow_pickle)
    out = claim_output(args.out, SAMPLE_OUTPUTS, overwrite=args.overwrite, what="samples")
    if args.settings:
        settings = read_settings(args.settings)
        image = pipe.reproduce(settings)
        out.mkdir(parents=True, exist_ok=True)
        from difflab.pipeline import Output

        write_atomic(out / "reproduced.png", png_bytes(Output(image[None], [settings]).pil[0], settings))
        write_atomic(out / "reproduced.json", json.dumps(settings, indent=1).encode())
        print(f"wrote {out}/reproduced.png")
        return 0
    labels = args.class_label or None
    prompts = args.prompt or None
    n = args.n if args.n is not None else (len(prompts) if prompts and len(prompts) > 1 else 16)
    loras, controls = _adapters(args, pipe, n)
    run = {"seed": args.seed, "steps": args.steps, "sampler": args.sampler, "schedule": args.schedule,
           "guidance": args.guidance, "guidance_options": _guidance_options(args), "accelerator": _accelerator(args),
           "calibrated": args.calibrated}
    started = time.perf_counter()
    result = pipe(n, class_labels=labels if labels is None or len(labels) > 1 else labels[0], prompts=prompts,
                  batch_size=args.batch_size, progress=not args.no_progress, loras=loras, controls=controls, **run)
    seconds = time.perf_counter() - started
    grid = result.save(out)
    print(f"wrote {grid}, {len(result.settings)} images with their settings (NNNNN.png, NNNNN.json) to {out}")
    if args.report:
        from difflab.accel import sampling_flops

        first = {"class_labels": labels[0] if labels else None, "prompts": prompts[0] if prompts else None}
        cost = sampling_flops(pipe, loras=loras, controls=_first_control(controls), **first, **run)
        report = {"images": n, "seconds": round(seconds, 3), "images_per_second": round(n / seconds, 2),
                  **{k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in cost.items()}}
        write_atomic(out / "report.json", json.dumps(report, indent=1).encode())
        print(f"report: {n} images in {seconds:.2f} s ({n / seconds:.2f} images/s); per image "
              f"{cost['gflops_per_image']:.3f} GFLOP over {cost['denoiser_calls']} denoiser calls "
              f"({cost['gflops_per_call']:.3f} GFLOP each"
              + (f", VAE decode {cost['decode_gflops']:.3f} GFLOP" if cost["decode_gflops"] else "")
              + f"); {out}/report.json")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from difflab.interop import open_pipeline

    pipe = open_pipeline(args.pipeline)
    try:
        nfes = sorted({int(v) for v in args.nfe.split(",")})
    except ValueError as err:
        raise ValueError(f"--nfe takes step counts separated by commas, like 5,6,8,10; got {args.nfe!r}") from err
    labels = args.class_label or None
    report = pipe.tune(nfes, sampler=args.sampler, sampler_options=_options(args.sampler_option) or None, n=args.n,
                       seed=args.seed, class_labels=labels if labels is None or len(labels) > 1 else labels[0],
                       prompts=args.prompt or None, guidance=args.guidance, guidance_options=_guidance_options(args),
                       reference_steps=args.reference_steps, max_evals=args.max_evals,
                       coefficient_evals=args.max_evals // 2, bespoke=args.bespoke,
                       progress=not args.no_progress)
    path = pipe.save_calibration(args.pipeline)
    print(f"held-out mean squared error to {args.reference_steps}-step dpmpp_3m ({args.n} images), "
          f"{args.sampler} on its best named schedule -> tuned:")
    for steps, r in report.items():
        print(f"  {steps:3d} steps: {r['held_out_start_mse']:.3e} -> {r['held_out_tuned_mse']:.3e} "
              f"({r['held_out_start_mse'] / max(r['held_out_tuned_mse'], 1e-30):.2f}x, tuned in {r['seconds']:.0f} s)")
    print(f"wrote {path}; sample with `difflab sample {args.pipeline} --steps N --calibrated`")
    return 0


def _scales(given: list[float] | None, count: int, what: str) -> list[float]:
    given = list(given or [])
    if len(given) > count:
        raise ValueError(f"{len(given)} --{what}-scale values for {count} --{what}")
    return given + [1.0] * (count - len(given))


def _adapters(args: argparse.Namespace, pipe, n: int) -> tuple[list, list]:
    """``--lora PATH`` and ``--control CONTROLNET IMAGE`` (one control image for every image), with
    their scales in order."""
    from difflab.adapters import Control, ControlNet, LoRA
    from difflab.data.folder import read_images

    identity = pipe.identity() if (args.lora or args.control) else None
    loras = [(LoRA.from_pretrained(path, pipe.network, base_identity=identity, allow_other_base=args.other_base),
              scale) for path, scale in zip(args.lora or [], _scales(args.lora_scale, len(args.lora or []), "lora"),
                                            strict=True)]
    controls = []
    for (folder, image), scale in zip(args.control or [], _scales(args.control_scale, len(args.control or []),
                                                                   "control"), strict=True):
        net = ControlNet.from_pretrained(folder, pipe.network, base_identity=identity,
                                         allow_other_base=args.other_base)
        picture = (read_images([image], net.settings["control_channels"], "control image") + 1) / 2
        controls.append(Control(net, picture.expand(n, -1, -1, -1), scale))
    return loras, controls


def _edit(args: argparse.Namespace) -> int:
    from difflab.data.folder import read_images, read_masks
    from difflab.files import claim_output
    from difflab.interop import open_pipeline

    pipe = open_pipeline(args.pipeline)
    if not args.images:
        if not (args.source_prompt and args.prompt):
            raise ValueError("give images to edit, or --source-prompt and --prompt for a prompt-to-prompt edit")
        out = claim_output(args.out, SAMPLE_OUTPUTS, overwrite=args.overwrite, what="edits")
        result = pipe.prompt_to_prompt(args.source_prompt, args.prompt, seed=args.seed, steps=args.steps,
                                       sampler=args.sampler, schedule=args.schedule, guidance=args.guidance,
                                       guidance_options=_guidance_options(args), cross_until=args.cross_until,
                                       blend=args.blend or None, reweight=_options(args.reweight) or None)
        grid = result.save(out)
        print(f"wrote {grid} and {len(result.settings)} prompt-to-prompt edits with their settings to {out}")
        return 0
    channels = pipe.image_channels
    images = read_images(args.images, channels)
    mask = read_masks(args.mask) if args.mask else None
    out = claim_output(args.out, SAMPLE_OUTPUTS, overwrite=args.overwrite, what="edits")
    labels, source_labels = args.class_label or None, args.source_class_label or None
    result = pipe.edit(images, mask=mask, strength=args.strength, prompts=args.prompt, class_labels=labels,
                       source_prompts=args.source_prompt, source_class_labels=source_labels, inversion=args.invert,
                       seed=args.seed, steps=args.steps, sampler=args.sampler, schedule=args.schedule,
                       guidance=args.guidance, guidance_options=_guidance_options(args), feather=args.feather,
                       resample=args.resample, jump=args.jump, batch_size=args.batch_size,
                       sources=[str(Path(p).resolve()) for p in args.images],
                       mask_sources=[str(Path(p).resolve()) for p in args.mask] if args.mask else None)
    grid = result.save(out)
    print(f"wrote {grid} and {len(result.settings)} edited images with their settings to {out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from difflab.serve import start

    start(args.pipelines, host=args.host, port=args.port, concurrency=args.concurrency, out_dir=args.out,
          loras=args.lora or (), controlnets=args.controlnet or ())
    return 0


def _eval(args: argparse.Namespace) -> int:

    from difflab import metrics
    from difflab.files import claim_output, write_atomic
    from difflab.interop import open_pipeline
    from difflab.metrics.reference import load_reference

    names = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    pipe = open_pipeline(args.pipeline)
    reference = load_reference(args.reference, n=args.n_reference, shape=None)
    fake = pipe(args.n, seed=args.seed, steps=args.steps, sampler=args.sampler, schedule=args.schedule,
                guidance=args.guidance, guidance_options=_guidance_options(args), batch_size=args.batch_size,
                progress=not args.no_progress).images
    options = {"path": args.inception} if args.features == "inception" and args.inception else {}
    result = metrics.compare(reference, fake, names, features=args.features, seed=args.seed, **options)
    result.update({"pipeline": str(args.pipeline), "reference": args.reference, "steps": args.steps or pipe.steps,
                   "sampler": args.sampler or pipe.sampler, "guidance": args.guidance or "default"})
    out = claim_output(args.out, ("metrics.json", "metrics.md"), overwrite=args.overwrite, what="evaluation")
    write_atomic(out / "metrics.json", json.dumps(result, indent=1).encode())
    text = metrics.table([{**result, "features": args.features}], ["sampler", "steps", "features"])
    write_atomic(out / "metrics.md", (text + "\n").encode())
    print(text)
    print(f"wrote {out}/metrics.json and {out}/metrics.md")
    return 0


def _export(args: argparse.Namespace) -> int:
    from difflab.files import claim_output
    from difflab.training.export import export

    pipe = export(args.run, use_ema=not args.no_ema)
    out = Path(args.out)
    if out.exists():  # checked before anything is written; the new pipeline replaces the old whole
        claim_output(out, (), overwrite=args.overwrite, what="pipeline")
    tmp = out.with_name(f".{out.name}.exporting")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="a pipeline folder (e.g. a training run's OUT_DIR/final)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's)")
    p.add_argument("--sampler", help="sampler name, see `difflab info` (default: the pipeline's)")
    p.add_argument("--schedule", help="schedule name (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i")
    p.add_argument("--guidance", help="cfg, apg, icg, pag or none (default: the pipeline's)")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--guidance-option", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --guidance-option rescale=0.7 --guidance-option 'interval=[0.3, 5.0]'")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--accelerator", help="a training-free accelerator, e.g. deep_cache (see `difflab info`)")
    p.add_argument("--accelerator-option", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --accelerator-option interval=3")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflab", description="Diffusion and flow-matching toolkit.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="list processes, predictions, samplers, schedules and guidance with references")
    p.set_defaults(func=_info)
    p = sub.add_parser("demo", help="digits: train, sample and score a class-conditional model; "
                                     "analytic: sample the exact 2-D mixture and measure the error")
    p.add_argument("kind", nargs="?", choices=("digits", "analytic"), default="digits")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the recipe")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--steps", type=int, help="sampling steps (default: 20 for digits, 10 for analytic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out (default: refuse)")
    p.set_defaults(func=_demo)
    p = sub.add_parser("train", help="train a model from a TOML recipe (a file or a built-in recipe name)")
    p.add_argument("config", nargs="?", help="TOML recipe; defaults apply to what it leaves out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=200 --set optim.lr=1e-3")
    p.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in out_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in out_dir (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
    p = sub.add_parser("adapt", help="train a LoRA (DreamBooth-style, with prior preservation), an LCM-LoRA or a "
                                      "ControlNet on a frozen pipeline from a TOML adapter recipe")
    p.add_argument("config", help="TOML adapter recipe (a file or a built-in name: dreambooth_lora, digits_lcm_lora, "
                                  "scenes_controlnet)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier adapter in out_dir")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_adapt)
    p = sub.add_parser("sample", help="sample a pipeline: a grid, the images, and per image a JSON of its settings")
    _add_sampling_options(p)
    p.add_argument("--n", type=int, help="number of images (default 16, or one per prompt)")
    p.add_argument("--class-label", type=int, action="append", help="class of the images (repeat for one each)")
    p.add_argument("--prompt", action="append", help="text prompt (repeat for one per image)")
    p.add_argument("--settings", help="an image's JSON, or a PNG difflab wrote (its settings are inside): make "
                   "exactly that image again")
    p.add_argument("--lora", action="append", metavar="PATH", help="a LoRA folder to apply (repeat for several)")
    p.add_argument("--lora-scale", type=float, action="append", help="each --lora's scale, in order (default 1)")
    p.add_argument("--control", nargs=2, action="append", metavar=("CONTROLNET", "IMAGE"),
                   help="a ControlNet folder and its control image (PNG, used for every image; repeat for "
                        "multi-control)")
    p.add_argument("--control-scale", type=float, action="append", help="each --control's scale, in order")
    p.add_argument("--other-base", action="store_true",
                   help="load LoRAs and ControlNets trained on other weights than this pipeline's")
    p.add_argument("--calibrated", action="store_true",
                   help="use the sampler, grid and coefficients `difflab tune` found for --steps")
    p.add_argument("--report", action="store_true",
                   help="also print (and write report.json) the wall time and the network FLOPs per image and per "
                        "denoiser call (PyTorch's FLOP counter, on one more image)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a diffusers folder's pickled .bin weights (torch's restricted unpickler; default: "
                        "safetensors only)")
    p.add_argument("--out", default="outputs/samples")
    p.add_argument("--overwrite", action="store_true", help="replace earlier samples in --out (default: refuse)")
    p.set_defaults(func=_sample)
    p = sub.add_parser("tune", help="calibrate a sampler for a pipeline at given step counts (grid and "
                                    "coefficients against a fine-step reference), saved in the folder")
    p.add_argument("pipeline", help="a pipeline folder")
    p.add_argument("--nfe", required=True, help="step counts, e.g. 5,6,8,10")
    p.add_argument("--sampler", default="unipc", help="the sampler to calibrate (default unipc: grid + DC-Solver "
                                                      "ratios; any other: grid only)")
    p.add_argument("--sampler-option", action="append", default=[], metavar="KEY=VALUE", help="e.g. order=3")
    p.add_argument("--bespoke", action="store_true",
                   help="then fit every coefficient of the tuned solver through the model (BNS, Shaul et al. 2024)")
    p.add_argument("--n", type=int, default=64, help="calibration images (and as many held out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-steps", type=int, default=100)
    p.add_argument("--max-evals", type=int, default=400,
                   help="sampling runs spent on the grid per step count (half as many on the coefficients)")
    p.add_argument("--class-label", type=int, action="append", help="class of the calibration images")
    p.add_argument("--prompt", action="append", help="prompts of the calibration images")
    p.add_argument("--guidance", help="cfg, apg, icg, pag or none (default: the pipeline's)")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--guidance-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_tune)
    p = sub.add_parser("edit", help="edit images: img2img (--strength), inpainting (--mask), inversion with a "
                                     "new prompt or class (--invert ddim|edict|bdia|null_text|SAMPLER); without "
                                     "images, prompt-to-prompt from --source-prompt to --prompt")
    _add_sampling_options(p)
    p.add_argument("images", nargs="*", help="PNG files of the pipeline's image size (none: prompt-to-prompt "
                                             "from --source-prompt to --prompt)")
    p.add_argument("--mask", action="append", help="PNG, white = repaint, black = keep (one, or one per image)")
    p.add_argument("--strength", type=float, help="how far back the image is noised, in (0, 1] (default 0.8; "
                                                  "inpainting and inversion 1)")
    p.add_argument("--invert", metavar="METHOD", help="invert with a deterministic sampler (ddim, dpmpp_2m, ...) "
                                                      "or exactly (edict, bdia), then sample with --prompt/--class")
    p.add_argument("--prompt", action="append", help="target prompt (one, or one per image)")
    p.add_argument("--class-label", type=int, action="append", help="target class (one, or one per image)")
    p.add_argument("--source-prompt", action="append", help="what the image shows (inversion; default: --prompt)")
    p.add_argument("--source-class-label", type=int, action="append", help="the image's class (inversion)")
    p.add_argument("--feather", type=float, default=0.0, help="soft mask edge, std in pixels")
    p.add_argument("--resample", type=int, default=1, help="RePaint: walks of each stretch of steps (1 = none)")
    p.add_argument("--jump", type=int, default=1, help="RePaint: steps per re-noised stretch")
    p.add_argument("--cross-until", type=float, default=0.2, help="prompt-to-prompt: copy the source's "
                                                                  "cross-attention maps while t is above this")
    p.add_argument("--blend", action="append", help="prompt-to-prompt: a word whose region may change (repeat)")
    p.add_argument("--reweight", action="append", default=[], metavar="WORD=FACTOR",
                   help="prompt-to-prompt: scale the target's attention to a word")
    p.add_argument("--out", default="outputs/edits")
    p.add_argument("--overwrite", action="store_true", help="replace earlier edits in --out (default: refuse)")
    p.set_defaults(func=_edit)
    p = sub.add_parser("serve", help="a local web page over pipelines: live previews, cancel, history, PNGs that "
                       "restore their settings, side-by-side comparison, a JSON API")
    p.add_argument("pipelines", nargs="+", metavar="PIPELINE", help="pipeline folders (one or more)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    p.add_argument("--concurrency", type=int, default=1, help="generations run at once; the rest queue")
    p.add_argument("--out", default=None, help="where the PNGs go (default: a new temporary folder)")
    p.add_argument("--lora", action="append", metavar="PATH",
                   help="a LoRA folder, offered with a scale on the page of the pipeline it was trained on (repeat)")
    p.add_argument("--controlnet", action="append", metavar="PATH",
                   help="a ControlNet folder, offered with a control image on its pipeline's page (repeat)")
    p.set_defaults(func=_serve)
    p = sub.add_parser("eval", help="FD / KID / precision-recall of a pipeline's samples against reference images")
    _add_sampling_options(p)
    p.add_argument("--metrics", default="fd,kid,pr", help="comma-separated: fd, kid, pr")
    p.add_argument("--features", default="pixels", help="pixels, digits, shapes or inception")
    p.add_argument("--inception", help="path of the TorchScript Inception-v3 (features=inception)")
    p.add_argument("--n", type=int, default=2000, help="samples to generate")
    p.add_argument("--reference", default="digits:test", help="digits:train, digits:test, shapes, or an image folder")
    p.add_argument("--n-reference", type=int, help="at most this many reference images")
    p.add_argument("--out", default="outputs/eval")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    p.set_defaults(func=_eval)
    p = sub.add_parser("export", help="turn a training run (latest checkpoint) or one checkpoint into a pipeline")
    p.add_argument("run", help="a run directory (OUT_DIR) or a checkpoint (OUT_DIR/checkpoints/step_N)")
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder at --out")
    p.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; an error prints one line (what, where, what to do) and exits 1. ``--debug`` or
    ``DIFFLAB_DEBUG=1`` shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args = build_parser().parse_args((["--debug"] if debug else []) + [a for a in argv if a != "--debug"])
    if args.debug or os.environ.get("DIFFLAB_DEBUG", "") not in ("", "0"):
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every error reaches the user as its message, not a traceback
        message = str(err) or type(err).__name__
        print(f"difflab {args.command}: error: {message}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
