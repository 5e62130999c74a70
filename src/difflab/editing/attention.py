"""Attention editing through the network hook interface.

:class:`PromptToPrompt` (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross-Attention
Control"): a source and a target prompt are sampled as one batch on the same noise; while the noise
level is high, the target's cross-attention maps are the source's (``replace``: the layout of the
image follows the source while the words change what is drawn), optionally its self-attention maps
too, and chosen tokens' attention can be scaled (``reweight``). ``blend`` tokens give the local
blending of the paper: the x0 estimate of the target is the source's outside the region those
tokens attend to, so the rest of the image stays the source's. It is a denoiser wrapper: every
sampler, process and prediction works, and guidance may sit inside it (wrap the guided denoiser).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab.batch import batch_times
from difflab.editing.inputs import EditError
from difflab.hooks import network_of

Tensor = torch.Tensor


def attention_probs(attn: Any, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d)) with a key-padding mask: (batch, heads, queries, keys)."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        if mask.dtype == torch.bool and mask.ndim == 2:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        else:
            scores = scores + mask
    return scores.softmax(-1)


def align_tokens(source: Sequence[str], target: Sequence[str], length: int) -> Tensor:
    """For each of ``length`` target positions the source position holding the same token in the
    longest matching blocks (difflib), or -1 (a new word, or padding): prompt-to-prompt's
    refinement alignment."""
    import difflib

    index = torch.full((length,), -1, dtype=torch.long)
    for block in difflib.SequenceMatcher(a=list(source), b=list(target), autojunk=False).get_matching_blocks():
        for k in range(block.size):
            if block.b + k < length:
                index[block.b + k] = block.a + k
    return index


class PromptToPrompt(nn.Module):
    """Wraps a (guided) denoiser sampled on batches ``[sources..., targets...]`` of ``2 * pairs``.

    * ``cross_until``: replace the target's cross-attention maps by the source's where t is above
      this (0 = every step, 1 = never); ``self_until`` the same for self-attention maps.
    * ``alignment``: (pairs, tokens) long, for each target token the source token whose attention
      it copies, -1 for a token the source lacks (it keeps its own): the paper's *refinement*, for
      prompts that add or change words (the token counts may then differ). Without it the maps are
      copied position by position (a word swap).
    * ``reweight``: ``{token index: factor}`` scales the target's attention to those tokens.
    * ``blend``: token indices whose attention (source and target) marks the region allowed to
      change; outside it (maps below ``threshold`` of their maximum) the target's x0 estimate is
      the source's.
    """

    def __init__(self, denoiser: Any, pairs: int, *, cross_until: float = 0.2, self_until: float = 1.0,
                 reweight: dict[int, float] | None = None, blend: Sequence[int] | None = None,
                 threshold: float = 0.3, alignment: Tensor | None = None):
        super().__init__()
        if network_of(denoiser) is None:
            raise EditError("prompt-to-prompt edits a network's cross-attention: the denoiser has no difflab "
                            "network (an analytic model or a plain function cannot be edited this way)")
        if not network_of(denoiser).attention_names("cross"):
            raise EditError("prompt-to-prompt needs a text-conditional network with cross-attention")
        for name, value in (("cross_until", cross_until), ("self_until", self_until)):
            if not 0.0 <= value <= 1.0:
                raise EditError(f"{name} is a time in [0, 1] (edit while t is above it), got {value}")
        self.denoiser, self.process, self.pairs = denoiser, denoiser.process, int(pairs)
        self.cross_until, self.self_until = cross_until, self_until
        self.reweight, self.blend, self.threshold = dict(reweight or {}), list(blend or []), threshold
        if alignment is not None:
            alignment = torch.as_tensor(alignment, dtype=torch.long)
            if alignment.ndim != 2 or alignment.shape[0] != self.pairs:
                raise EditError(f"alignment is (pairs, tokens): one source index (or -1) per target token of each of "
                                f"the {self.pairs} pairs, got shape {tuple(alignment.shape)}")
        self.alignment = alignment

    def _processor(self, active_cross: bool, active_self: bool, maps: list[Tensor]):
        n = self.pairs

        def process(attn, x, context, mask, rope):
            q, k, v = attn.qkv(x, context, rope)
            cross = context is not None
            active = active_cross if cross else active_self
            if not active and not (cross and self.blend):
                return attn.out(attn.attend(q, k, v, mask))
            probs = attention_probs(attn, q, k, mask)
            if probs.shape[0] % (2 * n):
                raise EditError(f"prompt-to-prompt was set up for {n} source/target pairs, but the network got a "
                                f"batch of {probs.shape[0]}")
            groups = probs.unflatten(0, (-1, 2, n))  # (groups, source|target, pairs, heads, queries, keys)
            if cross and self.blend:
                maps.append(groups[0][..., self.blend].sum(-1).mean(2))  # (2, pairs, queries): the cond group
            if active:
                target = groups[:, 0]
                if cross and self.alignment is not None:
                    index = self.alignment.to(probs.device)
                    if index.shape[1] != probs.shape[-1]:
                        raise EditError(f"the alignment covers {index.shape[1]} tokens, the prompts have "
                                        f"{probs.shape[-1]}")
                    picked = index.clamp_min(0).view(1, n, 1, 1, -1).expand_as(target)
                    target = torch.where(index.view(1, n, 1, 1, -1) >= 0, groups[:, 0].gather(-1, picked),
                                         groups[:, 1])
                if cross and self.reweight:
                    scale = torch.ones(probs.shape[-1], dtype=probs.dtype, device=probs.device)
                    for index, factor in self.reweight.items():
                        scale[index] = factor
                    target = target * scale
                groups = torch.stack([groups[:, 0], target], 1)
                probs = groups.flatten(0, 2)
            return attn.out(probs @ v)

        return process

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        if x.shape[0] != 2 * self.pairs:
            raise EditError(f"prompt-to-prompt samples {self.pairs} sources then {self.pairs} targets: a batch of "
                            f"{2 * self.pairs}, got {x.shape[0]}")
        mask = cond.get("context_mask")
        if mask is not None and self.cross_until < 1 and self.alignment is None \
                and not torch.equal(mask[: self.pairs], mask[self.pairs:]):
            raise EditError("replacing cross-attention maps position by position needs source and target prompts of "
                            "the same number of tokens (a word swap, e.g. 'red' -> 'blue'); these differ: give an "
                            "alignment (refinement)")
        level = float(batch_times(t, x)[0])
        maps: list[Tensor] = []
        processor = self._processor(level > self.cross_until, level > self.self_until, maps)
        net = network_of(self.denoiser)
        with net.hook_attention(processor, "all"):
            d = self.denoiser(x, t, **cond)
        if not self.blend or not maps:
            return d
        region = self._region(maps, x.shape[-2:])
        source, target = d[: self.pairs], d[self.pairs:]
        return torch.cat([source, source + region * (target - source)])

    def _region(self, maps: list[Tensor], size: torch.Size) -> Tensor:
        """Where the blend tokens are attended (source or target), at the image's size, in {0, 1}."""
        total = 0
        for m in maps:  # (2, pairs, queries) at each layer's resolution
            side = math.isqrt(m.shape[-1])
            grid = m.reshape(2, self.pairs, 1, side, side)
            total = total + F.interpolate(grid.flatten(0, 1), size=tuple(size), mode="bilinear",
                                          align_corners=False).unflatten(0, (2, self.pairs))
        union = total.amax(0)  # (pairs, 1, H, W): either prompt's region
        union = F.max_pool2d(union, 3, stride=1, padding=1)
        peak = union.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (union / peak > self.threshold).to(union.dtype)


class ConsistentSelfAttention(nn.Module):
    """StoryDiffusion's consistent self-attention (Zhou et al. 2024, "StoryDiffusion: Consistent
    Self-Attention for Long-Range Image and Video Generation"), training-free: in every self-attention
    layer each image of a story of ``story`` images also attends to a random ``rate`` of the other
    images' tokens, so the images share what they draw. Stories are consecutive groups of the batch
    (guidance's batched branches are groups of their own). ``until``: active while t is above it (0 =
    every step). The token choice is drawn from ``seed`` for each call, so runs repeat exactly and
    nothing is kept between calls; rate 0 is the plain network bit for bit."""

    def __init__(self, denoiser: Any, story: int, *, rate: float = 0.5, until: float = 0.0, seed: int = 0):
        super().__init__()
        net = network_of(denoiser)
        if net is None or not net.attention_names("self"):
            raise EditError("consistent self-attention needs a difflab network with self-attention layers")
        if story < 2:
            raise EditError(f"a story has at least 2 images, got {story}")
        if not 0.0 <= rate <= 1.0:
            raise EditError(f"rate is the fraction of the other images' tokens attended, in [0, 1], got {rate}")
        self.denoiser, self.process = denoiser, denoiser.process
        self.story, self.rate, self.until, self.seed = int(story), float(rate), float(until), int(seed)

    def _processor(self):
        n, rate = self.story, self.rate
        generator = torch.Generator().manual_seed(self.seed)

        def process(attn, x, context, mask, rope):
            q, k, v = attn.qkv(x, context, rope)
            batch, _, tokens, _ = k.shape
            if batch % n:
                raise EditError(f"consistent self-attention was set up for stories of {n}, but the network got a "
                                f"batch of {batch}")
            shared = max(1, int(rate * tokens))
            ks, vs = k.unflatten(0, (-1, n)), v.unflatten(0, (-1, n))  # (stories, n, heads, tokens, d)
            outs = []
            for i in range(n):
                others = [j for j in range(n) if j != i]
                pool_k = ks[:, others].transpose(1, 2).flatten(2, 3)  # (stories, heads, (n-1) tokens, d)
                pool_v = vs[:, others].transpose(1, 2).flatten(2, 3)
                pick = torch.randperm(pool_k.shape[2], generator=generator)[: shared * (n - 1)].to(k.device)
                k_i = torch.cat([ks[:, i], pool_k[:, :, pick]], 2)
                v_i = torch.cat([vs[:, i], pool_v[:, :, pick]], 2)
                outs.append(attn.attend(q.unflatten(0, (-1, n))[:, i], k_i, v_i))
            return attn.out(torch.stack(outs, 1).flatten(0, 1))

        return process

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        if self.rate == 0 or float(batch_times(t, x)[0]) <= self.until:
            return self.denoiser(x, t, **cond)
        with network_of(self.denoiser).hook_attention(self._processor(), "self"):
            return self.denoiser(x, t, **cond)
