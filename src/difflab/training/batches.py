"""The seeded batch plan: exactly which samples, noise, times and condition dropout step s sees.

This is what makes resume and multi-process training bit-exact: the data order of epoch e is a
permutation seeded by (seed, e), and the noise, times and dropout of (step, micro-step) are drawn
for the whole global batch from a generator seeded by (seed, step, micro), then split between
ranks. A resumed run, or a run on N processes, sees the batches of one uninterrupted single-process
run. Pure: no model, no device, no state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difflab.processes import Process
from difflab.training.losses import drop_condition, immiscible_noise

Tensor = torch.Tensor


@dataclass(frozen=True)
class BatchPlan:
    """``size`` samples in batches of ``batch_size`` (global, over ``world`` ranks), ``accumulate``
    micro-batches per optimizer step."""

    size: int
    batch_size: int
    seed: int
    accumulate: int = 1
    world: int = 1
    rank: int = 0
    t_distribution: str | None = None
    cond_dropout: float = 0.0
    immiscible: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.size < 1 or self.accumulate < 1:
            raise ValueError(f"a batch plan needs size, batch_size and accumulate >= 1, got {self.size}, "
                             f"{self.batch_size}, {self.accumulate}")
        if self.batch_size % self.world:
            raise ValueError(f"batch size {self.batch_size} is not divisible by the {self.world} processes")

    def indices(self, micro_step: int) -> Tensor:
        """Sample indices of global micro-step ``micro_step`` (= step * accumulate + micro)."""
        per_epoch = max(1, self.size // self.batch_size)
        epoch, k = divmod(micro_step, per_epoch)
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        return perm[k * self.batch_size: (k + 1) * self.batch_size]

    def draw(self, step: int, micro: int, process: Process, x: Tensor, labels: Tensor | None = None,
             captions: Tensor | None = None) -> dict[str, Tensor]:
        """This rank's share of the batch of (step, micro): ``x0``, ``noise``, ``t``, and ``labels`` /
        ``caption`` (row indices, -1 = the null condition) after condition dropout, ``seeds``: one
        integer per sample for objectives that draw more (an inpainting model's masks), ``index``:
        each sample's row in ``x`` (data paired with more, as reflow's noise) and ``step`` (curricula).
        On the CPU."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 64 + micro)
        idx = self.indices(step * self.accumulate + micro)
        x0 = x[idx]
        noise = torch.randn(x0.shape, generator=g)
        if self.immiscible:
            noise = immiscible_noise(x0, noise)
        t = process.sample_t(len(idx), distribution=self.t_distribution or None, generator=g)
        out = {"x0": x0, "noise": noise, "t": t}
        if labels is not None:
            out["labels"] = drop_condition(labels[idx], self.cond_dropout, g)
        if captions is not None:
            out["caption"] = drop_condition(captions[idx], self.cond_dropout, g)
        out["seeds"] = torch.randint(0, 2**62, (len(idx),), generator=g)
        out["index"], out["step"] = idx, torch.full((len(idx),), step)
        share = len(idx) // self.world
        return {k: v[self.rank * share: (self.rank + 1) * share] for k, v in out.items()}
