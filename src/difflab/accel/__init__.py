"""Training-free accelerators: wrappers of a denoiser that make its network do less per step,
built only on the network hook interface (:mod:`difflab.hooks`).

Each is registered by name with its options, so a pipeline takes one as data
(``pipe(..., accelerator={"name": "deep_cache", "interval": 3})``) and each image's settings record
it: :func:`accelerate` opens the named one around a denoiser."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from difflab.accel.block_cache import BlockCache, block_cache, deep_cache
from difflab.accel.flops import count_flops
from difflab.accel.token_merging import token_merging
from difflab.registry import Registry

REGISTRY: Registry = Registry("accelerator")
REGISTRY.add("deep_cache", deep_cache, "Ma et al. 2024, DeepCache: Accelerating Diffusion Models for Free")
REGISTRY.add("block_cache", block_cache, "Selvaraju et al. 2024, FORA; Chen et al. 2024, Delta-DiT (block reuse)")
REGISTRY.add("token_merging", token_merging, "Bolya & Hoffman 2023, Token Merging for Fast Stable Diffusion")


def accelerate(denoiser: Any, config: dict[str, Any]) -> AbstractContextManager:
    """The accelerator ``{"name": ..., **options}`` opened around ``denoiser``; the ``with`` yields
    the faster denoiser."""
    options = dict(config)
    return REGISTRY.get(options.pop("name", None))(denoiser, **options)


__all__ = ["REGISTRY", "BlockCache", "accelerate", "block_cache", "count_flops", "deep_cache", "token_merging"]
