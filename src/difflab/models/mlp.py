"""Residual MLP denoiser network for 2-D and tabular data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.batch import batch_times
from difflab.models.base import Network, check_conditioning
from difflab.models.layers import LabelEmbedder, LayerNorm, TimestepEmbedder, checkpointed, zero_

Tensor = torch.Tensor


@dataclass
class MLPConfig:
    dim: int = 2
    hidden: int = 256
    depth: int = 4
    num_classes: int | None = None
    dropout: float = 0.0
    step_size_embedding: bool = False  # a shortcut model's step size (forward's step_size=)
    guidance_embedding: bool = False  # a latent consistency model's guidance scale (forward's guidance_scale=)
    gradient_checkpointing: bool = False


class MLP(Network):
    """Pre-norm residual MLP with the time (and label) embedding added in every block;
    zero-initialised output. ``forward(x, t, class_labels=None, step_size=None, guidance_scale=None)`` with x of shape
    (batch, dim); ``step_size`` / ``guidance_scale`` with ``step_size_embedding`` / ``guidance_embedding``
    (shortcut models, latent consistency models)."""

    config_class = MLPConfig
    kind = "mlp"

    def __init__(self, config: MLPConfig):
        super().__init__(config)
        c = config
        self.inp = nn.Linear(c.dim, c.hidden)
        self.time_embed = TimestepEmbedder(c.hidden, frequency_dim=min(256, 2 * c.hidden))
        self.label_embed = LabelEmbedder(c.num_classes, c.hidden) if c.num_classes else None
        self.scalar_embedders(c.hidden, min(256, 2 * c.hidden))
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": LayerNorm(c.hidden), "emb": nn.Linear(c.hidden, c.hidden),
                           "fc1": nn.Linear(c.hidden, 2 * c.hidden), "fc2": zero_(nn.Linear(2 * c.hidden, c.hidden))})
            for _ in range(c.depth)
        )
        self.dropout = nn.Dropout(c.dropout)
        self.norm_out = LayerNorm(c.hidden)
        self.out = zero_(nn.Linear(c.hidden, c.dim))

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"block.{i}", b) for i, b in enumerate(self.blocks)]

    def residual_points(self) -> list[str]:
        return self.block_names()

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None,
                residuals: dict[str, Tensor] | None = None, step_size: Tensor | None = None,
                guidance_scale: Tensor | None = None) -> Tensor:
        c = self.config
        residuals = self.check_residuals(residuals)
        if x.ndim != 2 or x.shape[1] != c.dim:
            raise ValueError(f"MLP expects (batch, {c.dim}), got {tuple(x.shape)}")
        check_conditioning("MLP", c, class_labels)
        emb = self.time_embed(batch_times(t, x))
        if self.label_embed is not None:
            emb = emb + self.label_embed(class_labels)
        emb = self.add_scalar_conditions(emb, x, step_size=step_size, guidance_scale=guidance_scale)
        h = self.inp(x)
        for i, block in enumerate(self.blocks):
            def fn(h: Tensor, block=block) -> Tensor:
                z = block["norm"](h) + block["emb"](F.silu(emb))
                return h + block["fc2"](self.dropout(F.silu(block["fc1"](z))))

            h = self.run_block(f"block.{i}", checkpointed, fn, c.gradient_checkpointing and self.training, h)
            if f"block.{i}" in residuals:
                h = h + residuals[f"block.{i}"]
        return self.out(self.norm_out(h))
