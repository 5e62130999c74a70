"""Training-free accelerators: wrappers of a denoiser that make its network do less per step,
built only on the network hook interface (:mod:`difflab.hooks`)."""

from difflab.accel.block_cache import BlockCache, block_cache, deep_cache

__all__ = ["BlockCache", "block_cache", "deep_cache"]
