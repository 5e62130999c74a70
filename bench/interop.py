"""Converted networks against diffusers on the same weights (issue #14): forward time of difflab's
conversion and of the diffusers model it came from, interleaved call by call, one thread, and the
largest output difference. Ratios above 1 mean difflab is faster.

Run by hand, alone:  python bench/interop.py      (about 4 minutes)
Writes bench/results/interop.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel

from difflab.interop import from_diffusers

RESULTS = Path(__file__).parent / "results"
REPEATS = 15


def _randomise(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def cases():
    """(name, diffusers model, its call, difflab's call) on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    unet = _randomise(UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128),
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                                  layers_per_block=2, attention_head_dim=32))
    x, t = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([10.0, 300.0, 600.0, 900.0])
    yield "UNet2DModel 32x32 (DDPM-style), batch 4", unet, lambda m: m(x, t).sample, lambda n: n(x, t)
    sd = _randomise(UNet2DConditionModel(sample_size=16, block_out_channels=(64, 128, 128), layers_per_block=2,
                                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                           "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                         cross_attention_dim=128, attention_head_dim=8))
    z, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g)
    ts = torch.tensor([100.0, 800.0])
    yield ("UNet2DConditionModel SD-style 16x16 latents, 77 text tokens, batch 2", sd,
           lambda m: m(z, ts, encoder_hidden_states=ctx).sample, lambda n: n(z, ts, context=ctx))
    vae = _randomise(AutoencoderKL(block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",) * 3,
                                   up_block_types=("UpDecoderBlock2D",) * 3))
    lat = torch.randn(2, 4, 16, 16, generator=g)
    yield "AutoencoderKL decode 16x16 -> 64x64, batch 2", vae, lambda m: m.decode(lat).sample, lambda n: n.decode(lat)
    dit = _randomise(DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, num_layers=6,
                                           sample_size=16, patch_size=2, num_embeds_ada_norm=10))
    with torch.no_grad():
        first = dit.transformer_blocks[0].norm1.emb.state_dict()
        for block in dit.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    labels = torch.tensor([1, 7])
    yield ("DiTTransformer2DModel 384 wide, 6 blocks, 16x16 latents, batch 2", dit,
           lambda m: m(z, timestep=ts, class_labels=labels).sample, lambda n: n(z, ts, class_labels=labels))
    mmdit = _randomise(SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=6,
                                             attention_head_dim=64, num_attention_heads=6, joint_attention_dim=256,
                                             caption_projection_dim=384, pooled_projection_dim=128,
                                             pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0, 1)))
    text, pooled = torch.randn(2, 77 + 64, 256, generator=g), torch.randn(2, 128, generator=g)
    yield ("SD3Transformer2DModel (MMDiT, SD 3.5-style) 384 wide, 6 blocks, 16x16 latents, 141 text tokens, "
           "batch 2", mmdit, lambda m: m(z, encoder_hidden_states=text, pooled_projections=pooled, timestep=ts).sample,
           lambda n: n(z, ts, context=text, pooled=pooled))


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, model, theirs, mine in cases():
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            net = from_diffusers(folder)
        with torch.inference_mode():
            difference = float((theirs(model) - mine(net)).abs().max())
            for _ in range(2):
                theirs(model), mine(net)
            t_theirs, t_mine = [], []
            for _ in range(REPEATS):  # interleaved, so drifts of a shared machine hit both
                start = time.perf_counter()
                theirs(model)
                t_theirs.append(time.perf_counter() - start)
                start = time.perf_counter()
                mine(net)
                t_mine.append(time.perf_counter() - start)
        row = {"model": name, "diffusers_ms": 1e3 * statistics.median(t_theirs),
               "difflab_ms": 1e3 * statistics.median(t_mine), "max_abs_difference": difference}
        row["ratio"] = row["diffusers_ms"] / row["difflab_ms"]
        rows.append(row)
        print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"threads": 1, "repeats": REPEATS, "torch": torch.__version__}
    (RESULTS / "interop.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"Converted networks against diffusers on the same weights (1 thread, median of {REPEATS} interleaved "
             "calls; ratio = diffusers time / difflab time)", "",
             "| model | diffusers ms | difflab ms | ratio | max abs difference |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['diffusers_ms']:.1f} | {r['difflab_ms']:.1f} | {r['ratio']:.2f} | "
              f"{r['max_abs_difference']:.1e} |" for r in rows]
    (RESULTS / "interop.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
