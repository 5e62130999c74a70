"""Block caches: reuse what some of a network's blocks computed at an earlier step.

* :func:`deep_cache` — DeepCache (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for
  Free"): a U-Net's deep blocks (the deep down blocks, the middle and the deep up blocks) are
  computed on refresh steps only; in between, the shallow blocks run and the deep branch's output
  is reused.
* :func:`block_cache` with ``reuse="residual"`` — FORA / Delta-DiT style (Selvaraju et al. 2024;
  Chen et al. 2024) for transformers: a cached block adds the residual it added at the last
  refresh to its current input.

A cache is a context manager that yields a wrapped denoiser: use it for sampling calls inside the
``with``; it installs its hooks only while the network runs and drops every saved tensor on exit.
A new sampling run starts afresh (:mod:`difflab.accel.refresh`), so consecutive runs give the
images fresh runs give. ``refresh`` chooses the network evaluations (counted from the start of each
run) that recompute everything: every ``interval``-th (uniform) or an explicit list (non-uniform).
``cache.report`` counts evaluations and block reuses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from difflab.accel.refresh import RefreshClock
from difflab.batch import batch_times
from difflab.hooks import Hookable, network_of

Tensor = torch.Tensor


class BlockCache:
    """A denoiser whose network reuses the saved outputs (or residuals) of ``blocks`` between refreshes."""

    def __init__(self, denoiser: Any, network: Hookable, blocks: Sequence[str], refresh: int | Sequence[int],
                 reuse: str = "output"):
        if reuse not in ("output", "residual"):
            raise ValueError(f"reuse must be 'output' or 'residual', got {reuse!r}")
        unknown = sorted(set(blocks) - set(network.block_names()))
        if unknown:
            raise ValueError(f"the network has no block(s) {', '.join(unknown)}; its blocks: "
                             f"{', '.join(network.block_names())}")
        self.clock = RefreshClock(refresh)
        self.denoiser, self.network, self.process = denoiser, network, denoiser.process
        self.blocks, self.reuse = list(blocks), reuse
        self.report = {"evaluations": 0, "refreshes": 0, "block_reuses": 0, "runs": 0}
        self._saved: dict[str, Any] = {}

    def _hook(self, refreshing: bool) -> Callable:
        def hook(name: str, compute: Callable[[], Any], inputs: tuple) -> Any:
            if refreshing or name not in self._saved:
                out = compute()
                self._saved[name] = out - inputs[0] if self.reuse == "residual" else out
                return out
            # (counted in __call__, outside the network: a counter here would make torch.compile recompile)
            return inputs[0] + self._saved[name] if self.reuse == "residual" else self._saved[name]

        return hook

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = batch_times(t, x)
        if self.clock.new_run(x, t):
            self._saved = {}
            self.report["runs"] += 1
        _, refreshing = self.clock.tick()
        self.report["evaluations"] += 1
        self.report["refreshes"] += int(refreshing)
        reusing = not refreshing and all(name in self._saved for name in self.blocks)
        with self.network.hook_blocks(dict.fromkeys(self.blocks, self._hook(refreshing))):
            out = self.denoiser(x, t, **cond)
        self.report["block_reuses"] += len(self.blocks) if reusing else 0
        return out

    def clear(self) -> None:
        self._saved = {}
        self.clock.clear()


@contextmanager
def block_cache(denoiser: Any, blocks: Sequence[str], refresh: int | Sequence[int] = 2,
                reuse: str = "output") -> Iterator[BlockCache]:
    """Reuse ``blocks`` between refreshes for the sampling calls inside the ``with``."""
    network = network_of(denoiser)
    if network is None:
        raise ValueError("a block cache needs a denoiser over a difflab network (one with the hook interface); "
                         "this one has none (an analytic model or a plain function?)")
    cache = BlockCache(denoiser, network, blocks, refresh, reuse)
    try:
        yield cache
    finally:
        cache.clear()


def deep_cache_blocks(block_names: Sequence[str], depth: int = 1) -> list[str]:
    """The blocks DeepCache reuses in a U-Net named ``down.i`` / ``mid`` / ``up.i``: all but the
    first ``depth - 1`` down blocks, the middle, and all but the last ``depth`` up blocks (the
    shallow up blocks read only the skips of the shallow down blocks and the input convolution)."""
    downs = [n for n in block_names if n.startswith("down.")]
    ups = [n for n in block_names if n.startswith("up.")]
    if "mid" not in block_names or not downs or not ups:
        raise ValueError(f"DeepCache needs a U-Net's down / mid / up blocks; this network has {list(block_names)}")
    if not 1 <= depth <= len(ups) - 1:
        raise ValueError(f"depth must lie in [1, {len(ups) - 1}] for this U-Net, got {depth}")
    return [*downs[depth - 1:], "mid", *ups[: len(ups) - depth]]


@contextmanager
def deep_cache(denoiser: Any, interval: int | Sequence[int] = 3, depth: int = 1) -> Iterator[BlockCache]:
    """DeepCache (Ma et al. 2024): the U-Net's deep branch is computed on refresh evaluations only
    (every ``interval``-th, or the listed ones), the ``depth`` shallowest up blocks always."""
    network = network_of(denoiser)
    if network is None:
        raise ValueError("DeepCache needs a denoiser over a difflab U-Net")
    with block_cache(denoiser, deep_cache_blocks(network.block_names(), depth), interval, "output") as cache:
        yield cache
