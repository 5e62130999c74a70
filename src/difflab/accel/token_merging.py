"""Token merging for diffusion (ToMe, Bolya & Hoffman 2023, "Token Merging for Fast Stable
Diffusion"): before self-attention, the most similar tokens are merged into one (bipartite soft
matching), attention runs on the fewer tokens, and every merged token takes its group's output.

Through the attention hook only, on self-attention layers without rotary positions (cross-attention
is left alone: its keys are the text). The destination tokens are every fourth token in memory
order, a fixed 1-D stand-in for ToMe-SD's random one-per-2x2-cell choice (deterministic, and
independent of the image's shape). ``ratio`` is the fraction of a layer's tokens removed (at most
the three quarters that are not destinations); 0 is the unmerged network bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from difflab.hooks import network_of

Tensor = torch.Tensor


def bipartite_merge(x: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(merged tokens (B, N - r, C), for each original token the row of the merged token it went to (B, N)).

    Sources are the tokens not at multiples of 4; each picks its most cosine-similar destination,
    and the ``r`` sources most similar to theirs are averaged into it."""
    b, n, c = x.shape
    dst_idx = torch.arange(0, n, 4, device=x.device)
    src_mask = torch.ones(n, dtype=torch.bool, device=x.device)
    src_mask[dst_idx] = False
    src_idx = torch.nonzero(src_mask).squeeze(1)
    r = min(r, len(src_idx))
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = unit[:, src_idx] @ unit[:, dst_idx].transpose(1, 2)  # (B, S, D)
    best, target = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged_src, kept_src = order[:, :r], order[:, r:]
    dst = x[:, dst_idx].clone()
    counts = torch.ones(b, len(dst_idx), 1, dtype=x.dtype, device=x.device)
    tgt = target.gather(1, merged_src)
    moving = x[:, src_idx].gather(1, merged_src[..., None].expand(-1, -1, c))
    dst.scatter_add_(1, tgt[..., None].expand(-1, -1, c), moving)
    counts.scatter_add_(1, tgt[..., None], torch.ones_like(tgt[..., None], dtype=x.dtype))
    kept = x[:, src_idx].gather(1, kept_src[..., None].expand(-1, -1, c))
    out = torch.cat([dst / counts, kept], dim=1)
    # where each original token's output comes from: destinations first, then the kept sources
    slot = torch.empty(b, n, dtype=torch.long, device=x.device)
    slot[:, dst_idx] = torch.arange(len(dst_idx), device=x.device)
    src_slot = torch.empty(b, len(src_idx), dtype=torch.long, device=x.device)
    src_slot.scatter_(1, kept_src, len(dst_idx) + torch.arange(kept_src.shape[1], device=x.device).expand(b, -1))
    src_slot.scatter_(1, merged_src, tgt)
    slot[:, src_idx] = src_slot
    return out, slot


class TokenMerging:
    """The attention processor and its counts; see :func:`token_merging`."""

    def __init__(self, ratio: float):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"the merging ratio must lie in [0, 1), got {ratio}")
        self.ratio = ratio
        self.report = {"attention_calls": 0, "tokens_in": 0, "tokens_attended": 0}

    @torch.compiler.disable
    def _count(self, tokens_in: int, attended: int) -> None:
        """Not traced by torch.compile (a counter in the graph would make it recompile every call)."""
        self.report["attention_calls"] += 1
        self.report["tokens_in"] += tokens_in
        self.report["tokens_attended"] += attended

    def __call__(self, attn: Any, x: Tensor, context: Tensor | None, mask: Tensor | None, rope: Any) -> Tensor:
        r = int(x.shape[1] * self.ratio)
        if r == 0 or context is not None or rope is not None or mask is not None:
            self._count(x.shape[1], x.shape[1])
            q, k, v = attn.qkv(x, context, rope)
            return attn.out(attn.attend(q, k, v, mask))
        merged, slot = bipartite_merge(x, r)
        self._count(x.shape[1], merged.shape[1])
        q, k, v = attn.qkv(merged)
        out = attn.out(attn.attend(q, k, v))
        return out.gather(1, slot[..., None].expand(-1, -1, out.shape[-1]))


@contextmanager
def token_merging(denoiser: Any, ratio: float = 0.5, layers: Sequence[str] | None = None) -> Iterator[Any]:
    """ToMe on the network's self-attention layers (all, or the named ones) for the ``with``; yields
    the denoiser itself, with ``.report`` on the returned object's ``tome`` attribute."""
    network = network_of(denoiser)
    if network is None:
        raise ValueError("token merging needs a denoiser over a difflab network with self-attention")
    processor = TokenMerging(ratio)
    with network.hook_attention(processor, "self", layers):
        yield _Merged(denoiser, processor)


class _Merged:
    """The denoiser while ToMe is on (calls pass through; ``report`` counts the tokens)."""

    def __init__(self, denoiser: Any, processor: TokenMerging):
        self.denoiser, self.process, self.tome = denoiser, denoiser.process, processor

    @property
    def report(self) -> dict[str, int]:
        return self.tome.report

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.denoiser(x, t, **cond)
