"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis"), with SD 3.5's extra image-only
attention in chosen blocks and QK RMS-norm.

Image patches and text tokens are two streams with their own weights (projections, MLPs, adaLN
modulation) that meet in one attention over both. In difflab the streams travel as one tensor
``(batch, image tokens + text tokens, width)``, image first, so each block is a function of one
tensor and block hooks (caches) work on it as on a DiT block; the joint attention layer takes the
image tokens as ``x`` and the text tokens as ``context`` and returns both streams' outputs side by
side, so attention processors keep their one signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.batch import batch_times
from difflab.models.base import Network, check_image
from difflab.models.dit import modulate, sincos_2d
from difflab.models.layers import (
    Attention,
    FeedForward,
    LayerNorm,
    PooledEmbedder,
    RMSNorm,
    TimestepEmbedder,
    checkpointed,
    zero_,
)

Tensor = torch.Tensor


@dataclass
class MMDiTConfig:
    in_channels: int = 16
    out_channels: int | None = None
    patch_size: int = 2
    hidden_size: int = 1536
    depth: int = 24
    num_heads: int = 24
    mlp_ratio: float = 4.0
    context_dim: int = 4096  # the text tokens' width before the context embedder
    pooled_dim: int = 2048  # the pooled text embedding added to the time embedding
    position_grid: int = 96  # the sin-cos table covers this many patches a side; an image takes its centre
    sincos_base: int | None = 64  # positions rescaled as if the grid had this many patches (None: position_grid)
    qk_norm: bool = False  # RMS-norm of queries and keys per head (SD 3.5)
    dual_attention: tuple[int, ...] = ()  # blocks with a second, image-only attention (SD 3.5's MMDiT-X)
    gradient_checkpointing: bool = False


class JointAttention(Attention):
    """Attention over the image tokens ``x`` and the text tokens ``context`` at once: each stream
    projects its own queries, keys and values (``to_*`` and ``add_*``), one softmax runs over all
    tokens, and each stream gets its own output projection (the last block has none for text, whose
    output nothing reads). Returns ``(batch, image + text tokens, width)``; ``qkv`` and ``out`` deal
    in the joint sequence, so processors written for :class:`Attention` work unchanged."""

    def __init__(self, dim: int, heads: int, *, qk_norm: bool = False, text_out: bool = True, name: str = ""):
        super().__init__(dim, heads, qk_norm=qk_norm, name=name)
        self.add_q, self.add_k, self.add_v = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_add_q = RMSNorm(self.head_dim) if qk_norm else None
        self.norm_add_k = RMSNorm(self.head_dim) if qk_norm else None
        self.to_add_out = nn.Linear(dim, dim) if text_out else None
        self.image_tokens = 0  # set by each qkv call: where the joint sequence's text part starts

    def qkv(self, x: Tensor, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None
            ) -> tuple[Tensor, Tensor, Tensor]:
        if context is None:
            raise ValueError("joint attention needs the text tokens as context")
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(x)), self._split(self.to_v(x))
        cq, ck, cv = (self._split(proj(context)) for proj in (self.add_q, self.add_k, self.add_v))
        if self.norm_q is not None:
            q, k, cq, ck = self.norm_q(q), self.norm_k(k), self.norm_add_q(cq), self.norm_add_k(ck)
        self.image_tokens = x.shape[1]
        return torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)

    def out(self, h: Tensor) -> Tensor:
        h = h.transpose(1, 2).flatten(-2)
        image, text = h[:, : self.image_tokens], h[:, self.image_tokens:]
        return torch.cat([self.to_out(image), self.to_add_out(text) if self.to_add_out is not None else text], dim=1)


class AdaNorm(nn.Module):
    """LayerNorm without affine weights followed by ``chunks`` modulation vectors from the condition
    (adaLN-Zero, Peebles & Xie 2023): ``linear(silu(cond))`` split into ``chunks`` parts."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.norm = LayerNorm(dim, affine=False)
        self.linear = zero_(nn.Linear(dim, chunks * dim))
        self.chunks = chunks

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self.norm(x), self.linear(F.silu(cond)).chunk(self.chunks, dim=-1)


class MMDiTBlock(nn.Module):
    """One MMDiT block: adaLN-Zero modulation, joint attention and an MLP for each stream (the last
    block only reads the text: no text MLP, its text stream comes back unchanged)."""

    def __init__(self, c: MMDiTConfig, index: int):
        super().__init__()
        d = c.hidden_size
        self.last = index == c.depth - 1
        self.dual = index in c.dual_attention
        self.norm_image = AdaNorm(d, 9 if self.dual else 6)
        self.norm_text = AdaNorm(d, 2 if self.last else 6)  # last: shift and scale only (scale first)
        self.attn = JointAttention(d, c.num_heads, qk_norm=c.qk_norm, text_out=not self.last,
                                   name=f"block{index}.joint")
        self.attn2 = Attention(d, c.num_heads, qk_norm=c.qk_norm, name=f"block{index}.self") if self.dual else None
        self.norm_image2 = LayerNorm(d, affine=False)
        self.mlp = FeedForward(d, c.mlp_ratio)
        if not self.last:
            self.norm_text2 = LayerNorm(d, affine=False)
            self.mlp_text = FeedForward(d, c.mlp_ratio)

    def forward(self, tokens: Tensor, cond: Tensor, image_tokens: int, mask: Tensor | None = None) -> Tensor:
        x, text = tokens[:, :image_tokens], tokens[:, image_tokens:]
        nx, mods = self.norm_image(x, cond)
        shift, scale, gate, shift2, scale2, gate2 = mods[:6]
        nt, text_mods = self.norm_text(text, cond)
        if self.last:
            text_scale, text_shift = text_mods
            attn_text_in = modulate(nt, text_shift, text_scale)
        else:
            t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = text_mods
            attn_text_in = modulate(nt, t_shift, t_scale)
        joint = self.attn(modulate(nx, shift, scale), attn_text_in, mask)
        x = torch.addcmul(x, gate[:, None], joint[:, :image_tokens])
        if self.attn2 is not None:
            shift3, scale3, gate3 = mods[6:]
            x = torch.addcmul(x, gate3[:, None], self.attn2(modulate(nx, shift3, scale3)))
        x = torch.addcmul(x, gate2[:, None], self.mlp(modulate(self.norm_image2(x), shift2, scale2)))
        if not self.last:
            text = torch.addcmul(text, t_gate[:, None], joint[:, image_tokens:])
            text = torch.addcmul(text, t_gate2[:, None], self.mlp_text(modulate(self.norm_text2(text), t_shift2,
                                                                                t_scale2)))
        return torch.cat([x, text], dim=1)


class MMDiT(Network):
    """Multimodal diffusion transformer (Stable Diffusion 3) for latents of any size whose patch grid
    fits ``position_grid``.

    ``forward(x, t, context, pooled, context_mask=None, residuals=None)``: ``context`` the text
    tokens (batch, L, context_dim), ``pooled`` the pooled text embedding (batch, pooled_dim); a
    ``context_mask`` hides padded text tokens from every query (SD 3 attends to all of them).
    Residuals (a ControlNet's) add to block ``i``'s image tokens. Zero-initialised modulation and
    output: the output is exactly zero at initialisation.
    """

    config_class = MMDiTConfig
    kind = "mmdit"
    residual_layout = "tokens"

    def __init__(self, config: MMDiTConfig):
        super().__init__(config)
        c = config
        if c.depth < 1:
            raise ValueError(f"an MMDiT needs at least one block, got depth {c.depth}")
        bad = [i for i in c.dual_attention if not 0 <= i < c.depth]
        if bad:
            raise ValueError(f"dual_attention names block(s) {bad} outside 0..{c.depth - 1}")
        d, p = c.hidden_size, c.patch_size
        self.out_channels = c.out_channels or c.in_channels
        self.patch = nn.Conv2d(c.in_channels, d, p, stride=p)
        self.time_embed = TimestepEmbedder(d, cos_first=True, freq_shift=0.0)
        self.pooled_embed = PooledEmbedder(c.pooled_dim, d)
        self.context_embed = nn.Linear(c.context_dim, d)
        self.blocks = nn.ModuleList(MMDiTBlock(c, i) for i in range(c.depth))
        self.norm_out = AdaNorm(d, 2)
        self.proj_out = zero_(nn.Linear(d, p * p * self.out_channels))
        self.register_buffer("positions", sincos_2d(c.position_grid, c.position_grid, d, order="xy",
                                                    base=c.sincos_base or c.position_grid), persistent=False)

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"block.{i}", b) for i, b in enumerate(self.blocks)]

    def residual_points(self) -> list[str]:
        """``block.i``: added to block i's output image tokens."""
        return self.block_names()

    def position_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """The centre ``grid_h`` x ``grid_w`` of the sin-cos table, (tokens, width) row-major."""
        n = self.config.position_grid
        if grid_h > n or grid_w > n:
            raise ValueError(f"a {grid_h}x{grid_w} patch grid does not fit this MMDiT's {n}x{n} position table "
                             f"(at most {n * self.config.patch_size} pixels of latent a side)")
        top, left = (n - grid_h) // 2, (n - grid_w) // 2
        table = self.positions.view(n, n, -1)[top: top + grid_h, left: left + grid_w]
        return table.reshape(grid_h * grid_w, -1)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, pooled: Tensor | None = None,
                context_mask: Tensor | None = None, residuals: dict[str, Tensor] | None = None,
                class_labels: Tensor | None = None) -> Tensor:
        c = self.config
        check_image("MMDiT", x, c.in_channels, c.patch_size, "the patch size")
        if context is None or pooled is None:
            raise ValueError("an MMDiT attends to text: pass context (text tokens) and pooled (the pooled text "
                             "embedding); the null prompt's for the unconditional branch")
        if class_labels is not None:
            raise ValueError("an MMDiT is not class-conditional: it takes no class_labels")
        residuals = self.check_residuals(residuals)
        b, _, height, width = x.shape
        gh, gw = height // c.patch_size, width // c.patch_size
        image = self.patch(x).flatten(2).transpose(1, 2)
        image = image + self.position_embedding(gh, gw).to(image.dtype)[None]
        cond = (self.time_embed(batch_times(t, x)) + self.pooled_embed(pooled.to(image.dtype))).to(image.dtype)
        tokens = torch.cat([image, self.context_embed(context.to(image.dtype))], dim=1)
        n = image.shape[1]
        mask = None  # all text tokens seen (SD 3's padded prompts): no mask, the fastest attention
        if context_mask is not None and not bool(context_mask.all()):
            mask = torch.cat([context_mask.new_ones(b, n), context_mask.bool()], dim=1)
        for i, block in enumerate(self.blocks):
            tokens = self.run_block(f"block.{i}", lambda h, blk=block: checkpointed(
                lambda h_: blk(h_, cond, n, mask), c.gradient_checkpointing and self.training, h), tokens)
            if f"block.{i}" in residuals:
                tokens = torch.cat([tokens[:, :n] + residuals[f"block.{i}"], tokens[:, n:]], dim=1)
        normed, (scale, shift) = self.norm_out(tokens[:, :n], cond)
        out = self.proj_out(modulate(normed, shift, scale))
        out = out.view(b, gh, gw, c.patch_size, c.patch_size, self.out_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, self.out_channels, height, width)
