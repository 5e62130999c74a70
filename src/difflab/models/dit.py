"""Diffusion Transformers: DiT with adaLN-Zero (Peebles & Xie 2023), PixArt-alpha's adaLN-single with
cross-attention to text (Chen et al. 2023), in-context conditioning tokens, U-ViT / Hunyuan-DiT long
skips (Bao et al. 2023; Li et al. 2024), QK-norm and 2-D RoPE (Lumina)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from difflab.batch import batch_times
from difflab.models.base import Network, check_conditioning, check_image
from difflab.models.layers import (
    Attention,
    FeedForward,
    LabelEmbedder,
    LayerNorm,
    PooledEmbedder,
    TimestepEmbedder,
    checkpointed,
    rope_2d,
    zero_,
)

Tensor = torch.Tensor
CONDITIONINGS = ("adaln_zero", "adaln_single", "in_context")


@dataclass
class DiTConfig:
    in_channels: int = 4
    out_channels: int | None = None
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int | None = None
    context_dim: int | None = None  # text tokens: cross-attention in every block
    pooled_dim: int | None = None
    conditioning: str = "adaln_zero"  # adaln_zero | adaln_single | in_context
    position: str = "sincos"  # sincos | rope
    long_skip: bool = False
    qk_norm: bool = False
    fp32_norm: bool = False
    gradient_checkpointing: bool = False
    sincos_order: str = "yx"  # which coordinate fills the first half of the sin-cos embedding ("xy": DiT's, MAE's)
    time_cos_first: bool = True  # diffusers' flip_sin_to_cos
    time_freq_shift: float = 0.0  # diffusers' downscale_freq_shift (1 in its DiT)
    mlp_norm_eps: float = 1e-6  # the LayerNorm before the MLP (diffusers' DiT: norm_eps, 1e-5)
    sincos_base: int | None = None  # positions rescaled to a grid of this many patches (diffusers' base_size)
    sincos_scale: float = 1.0  # positions divided by this (PixArt's interpolation_scale)
    caption_projection: bool = False  # text tokens through Linear-GELU-Linear to the width first (PixArt)
    cross_norm: bool = True  # a LayerNorm before the cross-attention (PixArt has none)
    final_modulation: str = "linear"  # the output's shift and scale: "linear" of the condition, or PixArt's "table"


def sincos_2d(height: int, width: int, dim: int, device=None, order: str = "yx", base: int | None = None,
              scale: float = 1.0) -> Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE / DiT), any grid size: (tokens, dim); ``order``
    says which coordinate's sines and cosines come first; ``base``: positions rescaled as if the grid
    had ``base`` patches per side, ``scale``: then divided (diffusers' PatchEmbed base size and
    interpolation scale, as PixArt resizes its embedding)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    rows = torch.arange(height, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    if base is not None:
        rows, cols = rows / (height / base), cols / (width / base)
    ys, xs = torch.meshgrid(rows / scale, cols / scale, indexing="ij")
    if order not in ("yx", "xy"):
        raise ValueError(f"sincos order must be 'yx' or 'xy', got {order!r}")
    grids = (ys, xs) if order == "yx" else (xs, ys)
    out = [f(grid.flatten()[:, None] * omega) for grid in grids for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` in one fused op."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class DiTBlock(nn.Module):
    def __init__(self, c: DiTConfig, index: int):
        super().__init__()
        d = c.hidden_size
        affine = c.conditioning == "in_context"
        self.mode = c.conditioning
        self.norm1 = LayerNorm(d, affine=affine, fp32=c.fp32_norm)
        self.attn = Attention(d, c.num_heads, qk_norm=c.qk_norm, name=f"block{index}.self")
        self.cross = None
        if c.context_dim is not None:
            self.norm_cross = LayerNorm(d, fp32=c.fp32_norm) if c.cross_norm else nn.Identity()
            self.cross = Attention(d, c.num_heads, context_dim=d if c.caption_projection else c.context_dim,
                                   qk_norm=c.qk_norm,
                                   name=f"block{index}.cross")
        self.norm2 = LayerNorm(d, eps=c.mlp_norm_eps, affine=affine, fp32=c.fp32_norm)
        self.mlp = FeedForward(d, c.mlp_ratio)
        if self.mode == "adaln_zero":
            self.ada = zero_(nn.Linear(d, 6 * d))
        elif self.mode == "adaln_single":
            self.scale_shift_table = nn.Parameter(torch.randn(6, d) / math.sqrt(d))
        self.skip = nn.Linear(2 * d, d) if c.long_skip and index > c.depth // 2 else None

    def forward(self, x: Tensor, cond: Tensor, context, context_mask, rope, skip: Tensor | None) -> Tensor:
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))
        if self.mode == "in_context":
            x = x + self.attn(self.norm1(x), rope=rope)
            if self.cross is not None:
                x = x + self.cross(self.norm_cross(x), context, context_mask)
            return x + self.mlp(self.norm2(x))
        if self.mode == "adaln_zero":
            mods = self.ada(nn.functional.silu(cond)).chunk(6, dim=-1)
        else:  # adaln_single: one global modulation, a learned per-block offset
            mods = (cond.unflatten(-1, (6, -1)) + self.scale_shift_table[None]).unbind(1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        x = torch.addcmul(x, gate1[:, None], self.attn(modulate(self.norm1(x), shift1, scale1), rope=rope))
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, context_mask)
        return torch.addcmul(x, gate2[:, None], self.mlp(modulate(self.norm2(x), shift2, scale2)))


class DiT(Network):
    """Patch transformer for images or latents of any size divisible by the patch.

    ``forward(x, t, class_labels=None, context=None, context_mask=None, pooled=None)``.
    adaLN-Zero and the zero-initialised final layer make the output exactly zero at initialisation.
    """

    config_class = DiTConfig
    kind = "dit"
    encoder_only = False
    residual_layout = "tokens"  # residuals are (batch, tokens, width)

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        c = config
        if c.conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown DiT conditioning {c.conditioning!r}; choose one of {', '.join(CONDITIONINGS)}")
        if c.position not in ("sincos", "rope"):
            raise ValueError(f"DiT position must be 'sincos' or 'rope', got {c.position!r}")
        if c.final_modulation not in ("linear", "table"):
            raise ValueError(f"DiT final_modulation must be 'linear' or 'table', got {c.final_modulation!r}")
        d, p = c.hidden_size, c.patch_size
        self.out_channels = c.out_channels or c.in_channels
        self.patch = nn.Conv2d(c.in_channels, d, p, stride=p)
        self.time_embed = TimestepEmbedder(d, cos_first=c.time_cos_first, freq_shift=c.time_freq_shift)
        self.label_embed = LabelEmbedder(c.num_classes, d) if c.num_classes else None
        self.pooled_embed = PooledEmbedder(c.pooled_dim, d) if c.pooled_dim else None
        self.global_ada = zero_(nn.Linear(d, 6 * d)) if c.conditioning == "adaln_single" else None
        self.blocks = nn.ModuleList(DiTBlock(c, i) for i in range(c.depth))
        self.caption = (nn.Sequential(nn.Linear(c.context_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
                        if c.caption_projection and c.context_dim is not None else None)
        self.norm_out = LayerNorm(d, affine=False, fp32=c.fp32_norm)
        if c.final_modulation == "table":  # PixArt: a learned offset of the condition itself
            self.ada_out, self.final_table = None, nn.Parameter(torch.randn(2, d) / math.sqrt(d))
        else:
            self.ada_out = zero_(nn.Linear(d, 2 * d))
        self.proj_out = zero_(nn.Linear(d, p * p * self.out_channels))
        self.head_dim = d // c.num_heads
        nn.init.xavier_uniform_(self.patch.weight.view(d, -1))

    def _check(self, x: Tensor, class_labels, context) -> None:
        check_image("DiT", x, self.config.in_channels, self.config.patch_size, "the patch size")
        check_conditioning("DiT", self.config, class_labels, context)

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"block.{i}", b) for i, b in enumerate(self.blocks)]

    def residual_points(self) -> list[str]:
        """``block.i``: added to block i's output tokens (the PixArt ControlNet-Transformer's point)."""
        return self.block_names()

    def _embed(self, x: Tensor, t: Tensor, class_labels, context, pooled, hint: Tensor | None = None):
        """Patch tokens (plus ``hint`` tokens: a ControlNet's), rotary angles, the condition and
        the blocks' condition, and the number of prefix tokens."""
        self._check(x, class_labels, context)
        c = self.config
        gh, gw = x.shape[-2] // c.patch_size, x.shape[-1] // c.patch_size
        tokens = self.patch(x).flatten(2).transpose(1, 2).contiguous()  # (batch, tokens, width), row-major
        if hint is not None:
            tokens = tokens + hint.flatten(2).transpose(1, 2).to(tokens.dtype)
        rope = None
        if c.position == "sincos":
            tokens = tokens + sincos_2d(gh, gw, c.hidden_size, x.device, c.sincos_order, c.sincos_base,
                                        c.sincos_scale).to(tokens.dtype)[None]
        else:
            rope = rope_2d(gh, gw, self.head_dim, device=x.device)
        cond = self.time_embed(batch_times(t, x))
        if self.label_embed is not None:
            cond = cond + self.label_embed(class_labels)
        if self.pooled_embed is not None and pooled is not None:
            cond = cond + self.pooled_embed(pooled)
        cond = cond.to(tokens.dtype)
        n_prefix = 0
        if c.conditioning == "in_context":
            tokens = torch.cat([cond[:, None], tokens], dim=1)
            n_prefix = 1
            if rope is not None:  # the condition token sits at no position: identity rotation
                rope = (torch.cat([torch.ones_like(rope[0][:1]), rope[0]]),
                        torch.cat([torch.zeros_like(rope[1][:1]), rope[1]]))
        block_cond = self.global_ada(nn.functional.silu(cond)) if self.global_ada is not None else cond
        return tokens, rope, cond, block_cond, n_prefix

    def _project(self, context: Tensor | None) -> Tensor | None:
        """The text tokens the cross-attention sees (through the caption projection, if any)."""
        return self.caption(context) if self.caption is not None and context is not None else context

    def _block(self, i: int, tokens: Tensor, block_cond: Tensor, context, context_mask, rope, skip) -> Tensor:
        block = self.blocks[i]
        return self.run_block(
            f"block.{i}", lambda h, s: checkpointed(
                lambda h_, s_: block(h_, block_cond, context, context_mask, rope, s_),
                self.config.gradient_checkpointing and self.training, h, s), tokens, skip)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, pooled: Tensor | None = None,
                residuals: dict[str, Tensor] | None = None) -> Tensor:
        if self.encoder_only:
            raise ValueError("this DiT is an encoder copy (a ControlNet's): it has no output layers")
        residuals = self.check_residuals(residuals)
        c = self.config
        b, _, height, width = x.shape
        gh, gw = height // c.patch_size, width // c.patch_size
        tokens, rope, cond, block_cond, n_prefix = self._embed(x, t, class_labels, context, pooled)
        context = self._project(context)
        skips: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            skip = skips.pop() if block.skip is not None else None
            tokens = self._block(i, tokens, block_cond, context, context_mask, rope, skip)
            if f"block.{i}" in residuals:
                residual = residuals[f"block.{i}"]
                tokens = tokens + (residual if n_prefix == 0 else nn.functional.pad(residual, (0, 0, n_prefix, 0)))
            if c.long_skip and i < c.depth // 2:
                skips.append(tokens)
        tokens = tokens[:, n_prefix:]
        if self.ada_out is None:
            shift, scale = (self.final_table[None] + cond[:, None]).unbind(1)
        else:
            shift, scale = self.ada_out(nn.functional.silu(cond)).chunk(2, dim=-1)
        out = self.proj_out(modulate(self.norm_out(tokens), shift, scale))
        out = out.view(b, gh, gw, c.patch_size, c.patch_size, self.out_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, self.out_channels, height, width)

    # --- ControlNet (PixArt's ControlNet-Transformer, Chen et al. 2024) ---------------------------------
    def hint_spec(self) -> tuple[int, int]:
        """(channels, stride over the input) of the hint features :meth:`control_features` takes."""
        return self.config.hidden_size, self.config.patch_size

    def residual_widths(self) -> dict[str, int]:
        return {name: self.config.hidden_size for name in self.residual_points()}

    def control_features(self, x: Tensor, t: Tensor, hint: Tensor, class_labels: Tensor | None = None,
                         context: Tensor | None = None, context_mask: Tensor | None = None,
                         pooled: Tensor | None = None) -> dict[str, Tensor]:
        """Each block's output tokens (without prefix tokens) with ``hint`` added to the patch tokens."""
        tokens, rope, _, block_cond, n_prefix = self._embed(x, t, class_labels, context, pooled, hint)
        context = self._project(context)
        out = {}
        for i in range(len(self.blocks)):
            tokens = self._block(i, tokens, block_cond, context, context_mask, rope, None)
            out[f"block.{i}"] = tokens[:, n_prefix:]
        return out

    def encoder_copy(self, blocks: int | None = None) -> DiT:
        """A trainable copy of the embeddings and the first ``blocks`` blocks (half by default)
        without output layers: a ControlNet's copy."""
        blocks = self.config.depth // 2 if blocks is None else blocks
        if not 1 <= blocks <= self.config.depth:
            raise ValueError(f"a ControlNet copies 1..{self.config.depth} blocks of this DiT, not {blocks}")
        if self.config.long_skip and blocks > self.config.depth // 2:
            raise ValueError("a ControlNet of a long-skip DiT copies at most the first half of its blocks")
        twin = DiT(self.config)
        twin.blocks = twin.blocks[:blocks]
        twin.norm_out, twin.ada_out, twin.proj_out = nn.Identity(), None, None
        twin.load_state_dict({k: v for k, v in self.state_dict().items() if k in twin.state_dict()})
        twin.encoder_only = True
        return twin.to(next(self.parameters()).device)
