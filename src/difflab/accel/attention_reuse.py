"""Attention reuse in the manner of DiTFastAttn (Yuan et al. 2024, "DiTFastAttn: Attention
Compression for Diffusion Transformer Models"): attention outputs change little from one step to
the next and between the guidance branches, so

* **sharing across steps** (their AST): each attention layer's output is computed on refresh
  evaluations only (every ``refresh``-th of a run, or the listed ones) and reused in between;
* **sharing across the guidance branches** (their ASC): the layer attends for the first branch (the
  conditional one for CFG) only and gives that output to every branch.

Through the attention hook only (``processor(attn, x, context, mask, rope)``), on self-attention by
default: sharing cross-attention across branches would hand the text's attention to the
unconditional branch and cancel guidance there. It wraps the guided denoiser (a pipeline opens it
outside its guidance) so that it knows how many branches a network call stacks; without guidance it
shares across steps only. Each run starts afresh (:mod:`difflab.accel.refresh`); ``refresh=1``
without branch sharing is the plain network bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from difflab.accel.refresh import RefreshClock
from difflab.batch import batch_times
from difflab.hooks import network_of

Tensor = torch.Tensor


class AttentionReuse:
    """A (guided) denoiser whose network's attention layers reuse outputs across steps and branches."""

    def __init__(self, denoiser: Any, refresh: int | Sequence[int] = 2, share_branches: bool = False,
                 kind: str = "self", layers: Sequence[str] | None = None):
        from difflab.guidance import Guidance

        self.network = network_of(denoiser)
        if self.network is None:
            raise ValueError("attention reuse needs a denoiser over a difflab network with attention layers")
        names = self.network.attention_names(kind)
        unknown = sorted(set(layers or ()) - set(names))
        if unknown:
            raise ValueError(f"the network has no {kind} attention layer(s) {', '.join(unknown)}; it has "
                             f"{', '.join(names) or 'none'}")
        self.layers = list(layers) if layers is not None else names
        if not self.layers:
            raise ValueError(f"this network has no {kind} attention layers to reuse")
        if share_branches and not isinstance(denoiser, Guidance):
            raise ValueError("sharing attention across guidance branches needs a guided denoiser: sample with a "
                             "guidance method (e.g. guidance='cfg'), or set share_branches=False")
        self.denoiser, self.process, self.kind = denoiser, denoiser.process, kind
        self.share_branches, self.clock = bool(share_branches), RefreshClock(refresh)
        self.report = {"evaluations": 0, "refreshes": 0, "layer_reuses": 0, "runs": 0}
        self._saved: dict[int, Tensor] = {}
        self._rows = 0  # the batch this wrapper is called with; a network call stacks branches of it
        self._refreshing = True

    def _processor(self, attn: Any, h: Tensor, context: Tensor | None, mask: Tensor | None, rope: Any) -> Tensor:
        saved = self._saved.get(id(attn))
        if not self._refreshing and saved is not None and saved.shape[0] == h.shape[0]:
            return saved
        branches = h.shape[0] // self._rows if self._rows and h.shape[0] % self._rows == 0 else 1
        if self.share_branches and branches > 1:
            b = self._rows
            q, k, v = attn.qkv(h[:b], None if context is None else context[:b], rope)
            out = attn.out(attn.attend(q, k, v, None if mask is None else mask[:b]))
            out = out.repeat(branches, *([1] * (out.ndim - 1)))
        else:
            q, k, v = attn.qkv(h, context, rope)
            out = attn.out(attn.attend(q, k, v, mask))
        self._saved[id(attn)] = out
        return out

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = batch_times(t, x)
        if self.clock.new_run(x, t):
            self._saved = {}
            self.report["runs"] += 1
        _, self._refreshing = self.clock.tick()
        self.report["evaluations"] += 1
        self.report["refreshes"] += int(self._refreshing)
        reusing = not self._refreshing and len(self._saved) >= len(self.layers)
        self._rows = x.shape[0]
        with self.network.hook_attention(self._processor, self.kind, self.layers):
            out = self.denoiser(x, t, **cond)
        self.report["layer_reuses"] += len(self.layers) if reusing else 0
        return out

    def clear(self) -> None:
        self._saved = {}
        self.clock.clear()


@contextmanager
def attention_reuse(denoiser: Any, refresh: int | Sequence[int] = 2, share_branches: bool = False,
                    kind: str = "self", layers: Sequence[str] | None = None) -> Iterator[AttentionReuse]:
    """DiTFastAttn-style attention sharing for the ``with``: across steps between refreshes, and
    (``share_branches``) across the guidance branches of each evaluation."""
    reuse = AttentionReuse(denoiser, refresh, share_branches, kind, layers)
    try:
        yield reuse
    finally:
        reuse.clear()
