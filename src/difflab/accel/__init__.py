"""Training-free accelerators: wrappers of a denoiser that make its network do less per step,
built only on the network hook interface (:mod:`difflab.hooks`).

Each is registered by name with its options, so a pipeline takes one as data
(``pipe(..., accelerator={"name": "deep_cache", "interval": 3})``) and each image's settings record
it: :func:`accelerate` opens the named one around a denoiser. Most wrap the network's denoiser
(inside guidance); those in :data:`WRAPS_GUIDANCE` wrap the guided one."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from difflab.accel.attention_reuse import attention_reuse
from difflab.accel.block_cache import BlockCache, block_cache, deep_cache
from difflab.accel.flops import count_flops, sampling_flops
from difflab.accel.guidance_cache import guidance_cache, t_gate
from difflab.accel.int8 import calibrate_int8, int8
from difflab.accel.stitch import t_stitch
from difflab.accel.token_merging import token_merging
from difflab.registry import Registry

REGISTRY: Registry = Registry("accelerator")
REGISTRY.add("deep_cache", deep_cache, "Ma et al. 2024, DeepCache: Accelerating Diffusion Models for Free")
REGISTRY.add("block_cache", block_cache, "Selvaraju et al. 2024, FORA; Chen et al. 2024, Delta-DiT (block reuse)")
REGISTRY.add("token_merging", token_merging, "Bolya & Hoffman 2023, Token Merging for Fast Stable Diffusion")
REGISTRY.add("guidance_cache", guidance_cache, "Lv et al. 2024, FasterCache (its CFG cache)")
REGISTRY.add("t_gate", t_gate, "Zhang et al. 2024, Cross-Attention Makes Inference Cumbersome in Text-to-Image "
             "Diffusion Models (T-GATE)")
REGISTRY.add("attention_reuse", attention_reuse, "Yuan et al. 2024, DiTFastAttn: Attention Compression for "
             "Diffusion Transformer Models (sharing across steps and guidance branches)")
REGISTRY.add("int8", int8, "dynamic int8 linear layers; Li et al. 2023, Q-Diffusion: Quantizing Diffusion Models "
             "(timestep-aware static int8 for convolutions)")
REGISTRY.add("t_stitch", t_stitch, "Pan et al. 2024, T-Stitch: Accelerating Sampling in Pre-Trained Diffusion "
             "Models with Trajectory Stitching")
#: accelerators that wrap the guided denoiser (they reuse or share guidance branches, or T-Stitch: each network is
#: guided on its own), not the network's denoiser
WRAPS_GUIDANCE = ("attention_reuse", "guidance_cache", "t_gate", "t_stitch")


def wraps_guidance(config: dict[str, Any] | None) -> bool:
    """Whether the accelerator ``config`` wraps the guided denoiser (opened outside guidance)."""
    return bool(config) and config.get("name") in WRAPS_GUIDANCE


def accelerate(denoiser: Any, config: dict[str, Any]) -> AbstractContextManager:
    """The accelerator ``{"name": ..., **options}`` opened around ``denoiser``; the ``with`` yields
    the faster denoiser."""
    options = dict(config)
    return REGISTRY.get(options.pop("name", None))(denoiser, **options)


__all__ = ["REGISTRY", "WRAPS_GUIDANCE", "BlockCache", "accelerate", "attention_reuse", "block_cache",
           "calibrate_int8", "count_flops", "deep_cache", "guidance_cache", "int8", "sampling_flops", "t_gate",
           "t_stitch", "token_merging", "wraps_guidance"]
