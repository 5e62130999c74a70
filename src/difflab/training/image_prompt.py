"""Training an image-prompt adapter (IP-Adapter, Ye et al. 2023) on a frozen text-to-image pipeline:
each training image is its own reference; text and image are dropped now and then so both guidance
branches are learned. Only the adapter trains; the base pipeline is never changed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from difflab.adapters import ImagePromptAdapter
from difflab.training.losses import diffusion_loss
from difflab.training.optim import adamw

Tensor = torch.Tensor


def train_image_prompt(pipe, images: Tensor, prompts: Sequence[str], *, steps: int = 1500, batch_size: int = 32,
                       lr: float = 3e-4, tokens: int = 4, seed: int = 0, text_dropout: float = 0.1,
                       image_dropout: float = 0.05, progress: bool = True) -> ImagePromptAdapter:
    """An adapter for ``pipe`` (text-conditional, pixel or latent) trained on ``images`` (N, C, H, W)
    in [-1, 1] with their ``prompts``, for ``steps`` steps, deterministic for ``seed``."""
    if pipe.text_encoder_config is None:
        raise ValueError("an image-prompt adapter is trained on a text-conditional pipeline")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = pipe.network.eval().requires_grad_(False)
    adapter = ImagePromptAdapter(net, image_channels=images.shape[1], tokens=tokens).to(pipe.device)
    with torch.no_grad():
        data = torch.cat([pipe.vae.to_latent(images[i: i + 256].to(pipe.device)) for i in range(0, len(images), 256)]) \
            if pipe.vae is not None else images.to(pipe.device)
    encoder = pipe.text_encoder()
    text = {k: v.to(pipe.device) for k, v in encoder(list(prompts)).items()}
    null = {k: v.to(pipe.device) for k, v in encoder.null(1).items()}
    optimizer = adamw(list(adapter.parameters()), lr)
    process, prediction = pipe.process, pipe.prediction
    bar = tqdm(range(steps), desc="image-prompt adapter", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x0 = data[idx]
        t = process.sample_t(batch_size, distribution="logit_normal", generator=g).to(pipe.device)
        noise = torch.randn(x0.shape, generator=g).to(pipe.device)
        drop_text = (torch.rand(batch_size, generator=g) < text_dropout).to(pipe.device)
        drop_image = (torch.rand(batch_size, generator=g) < image_dropout).to(pipe.device)
        cond = {k: torch.where(drop_text.view(-1, *([1] * (v.ndim - 1))), null[k].expand_as(v[idx]), v[idx])
                for k, v in text.items()}
        tokens = adapter.embed(images[idx].to(pipe.device))
        tokens = torch.where(drop_image.view(-1, 1, 1), adapter.null_tokens(tokens[:, 0]), tokens)
        with net.hook_attention(adapter.processor(tokens, 1.0), "cross"):
            loss = diffusion_loss(net, x0, process, prediction, t=t, noise=noise, **cond).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    return adapter.eval()
