"""Convolutional blocks shared by the U-Net and the VAE (Ho et al. 2020; Dhariwal & Nichol 2021;
Rombach et al. 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difflab.models.layers import Attention, FeedForward, GroupNorm, LayerNorm, zero_

Tensor = torch.Tensor


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding as scale and shift of the second norm
    (ADM's "scale-shift norm"), or added before it (``time_mode="additive"``, DDPM's and diffusers'
    "default"); the second conv starts at zero so the block starts as identity."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None = None, dropout: float = 0.0,
                 groups: int = 32, fp32_norm: bool = False, *, eps: float = 1e-6, time_mode: str = "scale_shift"):
        super().__init__()
        if time_mode not in ("scale_shift", "additive"):
            raise ValueError(f"time_mode must be 'scale_shift' or 'additive', got {time_mode!r}")
        self.time_mode = time_mode
        self.norm1 = GroupNorm(groups, in_ch, eps=eps, fp32=fp32_norm)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        width = 2 * out_ch if time_mode == "scale_shift" else out_ch
        self.emb = nn.Linear(emb_dim, width) if emb_dim is not None else None
        self.norm2 = GroupNorm(groups, out_ch, eps=eps, fp32=fp32_norm)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None and self.time_mode == "additive":
            h = self.norm2(h + self.emb(F.silu(emb))[:, :, None, None])
        elif self.emb is not None:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """A stride-2 3x3 convolution; ``asymmetric``: padded on the right and bottom only (latent
    diffusion's autoencoder, diffusers' ``AutoencoderKL``)."""

    def __init__(self, ch: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialTransformer(nn.Module):
    """Attention over the pixels of a feature map. Without a context: GroupNorm and self-attention
    (ADM's attention block). With one: latent diffusion's transformer block (input projection,
    self-attention, cross-attention, GEGLU feed-forward, output projection). The last projection
    starts at zero, so the block starts as identity."""

    def __init__(self, ch: int, heads: int, *, context_dim: int | None = None, depth: int = 1,
                 groups: int = 32, qk_norm: bool = False, fp32_norm: bool = False, name: str = "",
                 eps: float = 1e-6, norm: bool = True, bias: bool = True, layer_norm_eps: float = 1e-6):
        super().__init__()
        self.norm = GroupNorm(groups, ch, eps=eps, fp32=fp32_norm) if norm else nn.Identity()
        self.full = context_dim is not None
        self.proj_in = nn.Linear(ch, ch) if self.full else nn.Identity()
        self.blocks = nn.ModuleList()
        for i in range(depth):
            block = nn.ModuleDict({
                "norm1": LayerNorm(ch, eps=layer_norm_eps, fp32=fp32_norm) if self.full else nn.Identity(),
                "attn1": Attention(ch, heads, qk_norm=qk_norm, bias=bias or not self.full, name=f"{name}.{i}.self"),
            })
            if not self.full:
                zero_(block["attn1"].to_out)
            if self.full:
                block.update({
                    "norm2": LayerNorm(ch, eps=layer_norm_eps, fp32=fp32_norm),
                    "attn2": Attention(ch, heads, context_dim=context_dim, qk_norm=qk_norm, bias=bias,
                                       name=f"{name}.{i}.cross"),
                    "norm3": LayerNorm(ch, eps=layer_norm_eps, fp32=fp32_norm),
                    "ff": FeedForward(ch, kind="geglu"),
                })
            self.blocks.append(block)
        self.proj_out = zero_(nn.Linear(ch, ch)) if self.full else nn.Identity()

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.blocks:
            if not self.full:  # ADM's block: x + attn(norm(x)); no residual of the normalised tokens
                tokens = block["attn1"](tokens)
                continue
            tokens = tokens + block["attn1"](block["norm1"](tokens))
            tokens = tokens + block["attn2"](block["norm2"](tokens), context, context_mask)
            tokens = tokens + block["ff"](block["norm3"](tokens))
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)
