"""Networks benchmark: difflab's U-Net and DiT against diffusers' at matched configurations.

Same widths, depths and attention placement; parameter counts are printed beside each pair. Each
measurement interleaves the two libraries in one process (difflab, diffusers, difflab, ...) and
reports medians and the ratio diffusers-time / difflab-time (> 1: difflab is faster).
Measured: forward passes (no grad) at batch 1, 16 and 64, and a training step (forward, MSE loss,
backward, AdamW step) at batch 16.

Run by hand, alone on the machine:  python bench/networks.py [--threads 1] [--repeats 7]
Writes bench/results/networks.json and bench/results/networks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.models import DiT, DiTConfig, UNet, UNetConfig

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).parent / "results"


def pairs():
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

    unet = (
        UNet(UNetConfig(in_channels=3, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                        attention_levels=(1, 2), head_dim=32)),
        UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128),
                    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32,
                    norm_num_groups=32, resnet_time_scale_shift="scale_shift"),
        (3, 32, 32), {}, lambda m, x, t, c: m(x, t).sample,
    )
    cond = (
        UNet(UNetConfig(in_channels=4, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                        attention_levels=(0, 1), head_dim=32, context_dim=384)),
        UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128),
                             layers_per_block=2,
                             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                             attention_head_dim=32, cross_attention_dim=384, norm_num_groups=32,
                             resnet_time_scale_shift="scale_shift"),
        (4, 16, 16), {"context": (16, 384)},
        lambda m, x, t, c: m(x, t, encoder_hidden_states=c["context"]).sample,
    )
    dit = (
        DiT(DiTConfig(in_channels=4, patch_size=2, hidden_size=384, depth=12, num_heads=6, num_classes=10)),
        DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=4,
                              num_layers=12, sample_size=16, patch_size=2, num_embeds_ada_norm=10),
        (4, 16, 16), {"class_labels": None},
        lambda m, x, t, c: m(x, timestep=t, class_labels=c["class_labels"]).sample,
    )
    return {"UNet (pixels 32x32, UNet2DModel)": unet, "UNet + cross-attention (latents 16x16, UNet2DConditionModel)":
            cond, "DiT-S/2 class-conditional (latents 16x16, DiTTransformer2DModel)": dit}


def _matched_parameters(model) -> int:
    """Parameters of a diffusers model, leaving out the copies of the timestep and class embedder
    that diffusers' DiT keeps in every block's AdaLayerNormZero (``*.norm1.emb.*``, 3.0M for
    DiT-S/2): DiT and difflab embed the condition once and share it. They act on one vector per
    image, so they add parameters but almost no arithmetic."""
    return sum(p.numel() for name, p in model.named_parameters() if ".norm1.emb." not in name)


def _inputs(shape, extras, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    cond = {}
    for key, spec in extras.items():
        if spec is None:
            cond[key] = torch.randint(0, 10, (batch,), generator=g)
        else:
            cond[key] = torch.randn(batch, *spec, generator=g)
    return x, t, cond


def _ours(model, x, t, cond):
    kwargs = {"class_labels": cond["class_labels"]} if "class_labels" in cond else {}
    if "context" in cond:
        kwargs["context"] = cond["context"]
    return model(x, t, **kwargs)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(pair, batch: int, repeats: int, train: bool) -> dict:
    ours, theirs, shape, extras, call_theirs = pair
    x, t, cond = _inputs(shape, extras, batch)
    runners = {}
    for name, model, call in (("difflab", ours, _ours), ("diffusers", theirs, call_theirs)):
        if train:
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, call=call, opt=opt):
                loss = F.mse_loss(call(model, x, t, cond), x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:
            model.eval()

            def step(model=model, call=call):
                with torch.no_grad():
                    call(model, x, t, cond)
        runners[name] = step
    for step in runners.values():  # warm-up
        step()
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, step in runners.items():
            times[name].append(_time(step))
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"difflab_s": med["difflab"], "diffusers_s": med["diffusers"], "ratio": med["diffusers"] / med["difflab"]}


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default="", help="measure only the models whose label contains this text "
                        "(printed, not written)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for label, pair in pairs().items():
        if args.only not in label:
            continue
        ours, theirs = pair[0], pair[1]
        params = (ours.num_parameters(), _matched_parameters(theirs))
        for batch, train in [(1, False), (16, False), (64, False), (16, True)]:
            row = {"model": label, "batch": batch, "mode": "train step" if train else "forward",
                   "params_difflab": params[0], "params_diffusers": params[1],
                   **measure(pair, batch, args.repeats if batch < 64 else max(3, args.repeats // 2), train)}
            results.append(row)
            print(f"{label:70s} {row['mode']:10s} b={batch:<3d} difflab {row['difflab_s'] * 1e3:8.1f} ms  "
                  f"diffusers {row['diffusers_s'] * 1e3:8.1f} ms  ratio {row['ratio']:.2f}x", flush=True)
    if args.only:
        return
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "threads": args.threads,
            "repeats": args.repeats}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "networks.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = ["# Networks: difflab vs diffusers (median wall time, ratio = diffusers / difflab)", "",
             f"diffusers {meta['diffusers']}, torch {meta['torch']}, CPU, {args.threads} thread(s), "
             f"{args.repeats} interleaved repeats. *diffusers' DiT keeps a copy of the timestep and class "
             "embedder in every block (3.0M parameters, 35.24M in all); they are left out of its count.", "",
             "| model | params difflab / diffusers* | mode | batch | difflab ms | diffusers ms | ratio |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['params_difflab'] / 1e6:.2f}M / {r['params_diffusers'] / 1e6:.2f}M | "
                     f"{r['mode']} | {r['batch']} | {r['difflab_s'] * 1e3:.1f} | {r['diffusers_s'] * 1e3:.1f} | "
                     f"{r['ratio']:.2f}x |")
    (RESULTS / "networks.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
