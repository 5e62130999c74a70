"""Training the KL autoencoder of latent diffusion (Rombach et al. 2022), and encoding a dataset once.

Reconstruction (L1 + MSE) plus a small KL term (``models.vae.vae_loss``), AdamW, a fixed data order
and noise from ``seed``; the latent scaling factor is fitted on the training images at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from difflab.models import VAE, Network
from difflab.models.vae import vae_loss
from difflab.training.optim import adamw

Tensor = torch.Tensor

VAE_DEFAULTS: dict[str, Any] = {"base_channels": 32, "channel_mult": [1, 2, 2], "latent_channels": 4,
                                "num_res_blocks": 1, "norm_groups": 16, "mid_attention": False}


def train_vae(images: Tensor, out: str | os.PathLike, *, steps: int = 1500, batch_size: int = 32, lr: float = 1e-3,
              kl_weight: float = 1e-6, seed: int = 0, progress: bool = True, checkpoint_every: int = 100,
              **model: Any) -> VAE:
    """Train a VAE on ``images`` (N, C, H, W) in [-1, 1]; save it (with its scaling factor) to ``out``.

    ``model`` overrides :data:`VAE_DEFAULTS` (``base_channels``, ``channel_mult``, ...). An ``out`` that
    already holds a VAE is loaded instead of retrained (delete it to train again). Training writes a
    checkpoint to ``out/checkpoints`` every ``checkpoint_every`` steps and continues from the latest
    one when restarted, bit for bit as if never interrupted; settings other than those it was
    started with are refused."""
    from tqdm import tqdm

    from difflab.training import checkpoint

    out = Path(out)
    if (out / "model.safetensors").is_file():
        return Network.from_pretrained(out).eval()
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "seed": seed,
                "model": {**VAE_DEFAULTS, **model}, "images": list(images.shape)}
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = VAE.from_config({**VAE_DEFAULTS, **model, "in_channels": images.shape[1]})
    opt = adamw(vae.parameters(), lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    perm = torch.randperm(len(images), generator=g)
    pos, start = 0, 0
    found = checkpoint.latest(out)
    if found is not None:
        record = checkpoint.read_record(found)
        if json.dumps(record["config"], sort_keys=True) != json.dumps(settings, sort_keys=True):
            raise ValueError(f"{out} holds a VAE training started with other settings ({record['config']}); "
                             f"delete {out} to train this one ({settings})")
        start = checkpoint.load(found, model=vae, ema=None, optimizer=opt, scheduler=sched)["step"]
        g.set_state(torch.tensor(record["generator"], dtype=torch.uint8))
        perm, pos = torch.tensor(record["perm"]), int(record["pos"])
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train VAE", disable=not progress,
               dynamic_ncols=True)
    vae.train()
    for step in bar:
        if pos + batch_size > len(images):
            perm, pos = torch.randperm(len(images), generator=g), 0
        batch = images[perm[pos: pos + batch_size]]
        pos += batch_size
        recon, posterior = vae(batch, generator=g)
        losses = vae_loss(recon, batch, posterior, kl_weight=kl_weight)
        if not torch.isfinite(losses["total"]):
            raise RuntimeError(f"the VAE loss is {float(losses['total'])} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(rec=f"{float(losses['reconstruction'].detach()):.4f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            checkpoint.save(out, step + 1, model=vae, ema=None, optimizer=opt, scheduler=sched, config=settings,
                            extra={"generator": g.get_state().tolist(), "perm": perm.tolist(), "pos": pos})
    vae.eval()
    with torch.no_grad():
        vae.fit_scaling(images[:2048])
    vae.save_pretrained(out)  # model.safetensors last: a folder with it holds a finished VAE
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return vae


@torch.no_grad()
def encode_dataset(vae: VAE, images: Tensor, batch_size: int = 256) -> Tensor:
    """The scaled latents (posterior means) of all ``images``: computed once, reused every epoch."""
    vae.eval()
    return torch.cat([vae.to_latent(images[i: i + batch_size]) for i in range(0, len(images), batch_size)])
