"""Accelerators over the guidance branches: guidance costs a second network evaluation per step
(the unconditional, perturbed or weak branch); these run it less often.

* :func:`guidance_cache` — the CFG cache of FasterCache (Lv et al. 2024, "FasterCache:
  Training-Free Video Diffusion Model Acceleration with High Quality"), in its plain form: the
  guidance update (guided minus conditional estimate, ``(s - 1)(D_c - D_u)`` for CFG) is computed
  on refresh evaluations and held between them, where only the conditional branch runs. It works
  for every guidance method that has a conditional branch (CFG, APG, PAG, autoguidance, ICG).
* :func:`t_gate` — T-GATE (Zhang et al. 2024, "Cross-Attention Makes Inference Cumbersome in
  Text-to-Image Diffusion Models"): after the gate evaluation the cross-attention outputs are frozen
  at their mean over the guidance branches at the gate, and guidance stops: one branch per step with
  no cross-attention computed.

Both wrap a guided denoiser (:class:`difflab.guidance.Guidance`), so a pipeline opens them outside
its guidance (``pipe(..., guidance="cfg", accelerator={"name": "guidance_cache", "refresh": 2})``);
without guidance they are refused. Each run starts afresh (:mod:`difflab.accel.refresh`).
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


def _guidance_of(guided: Any, what: str):
    from difflab.guidance import Guidance

    if not isinstance(guided, Guidance):
        raise ValueError(f"{what} reuses the guidance branches, and this denoiser has no guidance: sample with a "
                         "guidance method (e.g. guidance='cfg' at a scale above 1), or use a network-level "
                         "accelerator (deep_cache, block_cache, token_merging)")
    return guided


class GuidanceCache:
    """A guided denoiser whose guidance update is recomputed on refresh evaluations only."""

    def __init__(self, guided: Any, refresh: int | Sequence[int] = 2):
        self.guidance = _guidance_of(guided, "the guidance cache")
        self.process, self.clock = self.guidance.process, RefreshClock(refresh)
        self.report = {"evaluations": 0, "refreshes": 0, "branches_skipped": 0, "runs": 0}
        self._update: Tensor | None = None

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = batch_times(t, x)
        g = self.guidance
        if self.clock.new_run(x, t):
            self._update = None
            self.report["runs"] += 1
        _, refreshing = self.clock.tick()
        self.report["evaluations"] += 1
        on = g.active(t)
        if on is not None and not bool(on.any()):
            return g.denoiser(x, t, **cond)
        if refreshing or self._update is None:
            self.report["refreshes"] += 1
            guided, conditional = g.guide(x, t, cond)
            self._update = guided - conditional
        else:
            self.report["branches_skipped"] += 1
            conditional = g.denoiser(x, t, **cond)
            guided = conditional + self._update
        return g.select(on, guided, conditional)


@contextmanager
def guidance_cache(guided: Any, refresh: int | Sequence[int] = 2) -> Iterator[GuidanceCache]:
    """Hold the guidance update between refreshes (every ``refresh``-th evaluation, or the listed
    ones): on the others a guided step costs one branch."""
    cache = GuidanceCache(guided, refresh)
    try:
        yield cache
    finally:
        cache._update = None
        cache.clock.clear()


class TGate:
    """A guided denoiser that, from evaluation ``gate`` of each run on, runs the conditional branch
    alone with every cross-attention layer's output frozen at its branch mean at the gate."""

    def __init__(self, guided: Any, gate: int):
        self.guidance = _guidance_of(guided, "T-GATE")
        if isinstance(gate, bool) or not isinstance(gate, int) or gate < 1:
            raise ValueError(f"the gate is the number of evaluations with full guidance, at least 1; got {gate!r}")
        network = network_of(self.guidance.denoiser)
        if network is None or not network.attention_names("cross"):
            raise ValueError("T-GATE freezes cross-attention, and this network has none (a class-conditional or "
                             "unconditional model?); use the guidance cache instead")
        self.network, self.gate, self.process = network, gate, self.guidance.process
        self.clock = RefreshClock(1)
        self.report = {"evaluations": 0, "gated": 0, "runs": 0}
        self._frozen: dict[int, Tensor] = {}
        self._batch = 0  # the batch of the gate evaluation (its branches are stacked along it)

    def _record(self, attn, h, context, mask, rope) -> Tensor:
        q, k, v = attn.qkv(h, context, rope)  # the plain computation, through the layer's own parts
        out = attn.out(attn.attend(q, k, v, mask))
        self._frozen[id(attn)] = out.unflatten(0, (-1, self._batch)).mean(0)  # the mean over the branches
        return out

    def _replay(self, attn, h, context, mask, rope) -> Tensor:
        return self._frozen[id(attn)]

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = batch_times(t, x)
        if self.clock.new_run(x, t):
            self._frozen = {}
            self.report["runs"] += 1
        call, _ = self.clock.tick()
        self.report["evaluations"] += 1
        if call < self.gate - 1:
            return self.guidance(x, t, **cond)
        if call == self.gate - 1:  # the gate: full guidance, and each cross-attention's output kept
            self._batch = x.shape[0]
            with self.network.hook_attention(self._record, "cross"):
                return self.guidance(x, t, **cond)
        self.report["gated"] += 1
        with self.network.hook_attention(self._replay, "cross"):
            return self.guidance.denoiser(x, t, **cond)


@contextmanager
def t_gate(guided: Any, gate: int = 10) -> Iterator[TGate]:
    """T-GATE: full guidance for the first ``gate`` evaluations of each run, then one branch with
    frozen cross-attention."""
    gated = TGate(guided, gate)
    try:
        yield gated
    finally:
        gated._frozen = {}
        gated.clock.clear()
