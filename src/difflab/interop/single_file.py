"""Original single-file Stable Diffusion checkpoints (CompVis / Stability latent-diffusion key
naming: ``model.diffusion_model.input_blocks...``, ``first_stage_model...``) as difflab networks.

The family is read from the keys and shapes, never from the file name: the U-Net's widths, levels,
attention levels, transformer depth and context width come from its weights; SD 1.x (1x1-convolution
projections, 768-wide text) has 8 heads at every level, SD 2.x (linear projections) heads of width
64. The VAE's widths and depth come from its weights too. Files are read with safetensors only: a
``.ckpt`` is a pickle and is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflab.files import load_pickled_tensors, load_tensors
from difflab.interop.schedulers import ConversionError
from difflab.interop.weights import conv_as_linear, copy_mapped
from difflab.models import VAE, UNet, UNetConfig, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
#: Stable Diffusion 1.x / 2.x latent scaling (Rombach et al. 2022, Sec. 4.3.2)
SD_SCALING = 0.18215


@dataclass
class SingleFile:
    """What a single-file checkpoint held: its family, the converted networks, and the keys of
    parts not converted (``left``: prefix -> count)."""

    family: str
    unet: UNet | None = None
    vae: VAE | None = None
    left: dict[str, int] = field(default_factory=dict)


def _res(src: str, dst: str) -> dict[str, str]:
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "emb", "out_layers.0": "norm2",
             "out_layers.3": "conv2", "skip_connection": "skip"}
    return {f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def _transformer(src: str, dst: str, depth: int) -> dict[str, str]:
    out = {f"{src}.{a}.{p}": f"{dst}.{a}.{p}" for a in ("norm", "proj_in", "proj_out") for p in ("weight", "bias")}
    for d in range(depth):
        names = {"norm1": "norm1", "norm2": "norm2", "norm3": "norm3", "ff.net.0.proj": "ff.proj_in",
                 "ff.net.2": "ff.proj_out"}
        for attn in ("attn1", "attn2"):
            names.update({f"{attn}.{x}": f"{attn}.{x}" for x in ("to_q", "to_k", "to_v")})
            names[f"{attn}.to_out.0"] = f"{attn}.to_out"
        out.update({f"{src}.transformer_blocks.{d}.{a}.{p}": f"{dst}.blocks.{d}.{b}.{p}"
                    for a, b in names.items() for p in ("weight", "bias")})
    return out


def ldm_unet_key_map(config: UNetConfig) -> dict[str, str]:
    """Latent diffusion's U-Net weight name (without the prefix) -> difflab's. The two U-Nets are laid
    out alike: difflab's ``down.k`` is ``input_blocks.{k+1}``, ``up.k`` is ``output_blocks.k``."""
    out = {f"input_blocks.0.0.{p}": f"conv_in.{p}" for p in ("weight", "bias")}
    out.update({f"time_embed.{i}.{p}": f"time_embed.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")})
    out.update({f"out.0.{p}": f"norm_out.{p}" for p in ("weight", "bias")})
    out.update({f"out.2.{p}": f"conv_out.{p}" for p in ("weight", "bias")})
    depth, levels, r = config.transformer_depth, len(config.channel_mult), config.num_res_blocks
    k = 0
    for level in range(levels):
        for _ in range(r):
            out.update(_res(f"input_blocks.{k + 1}.0", f"down.{k}.0"))
            out.update(_transformer(f"input_blocks.{k + 1}.1", f"down.{k}.1", depth))
            k += 1
        if level != levels - 1:
            out.update({f"input_blocks.{k + 1}.0.op.{p}": f"down.{k}.0.conv.{p}" for p in ("weight", "bias")})
            k += 1
    out.update(_res("middle_block.0", "mid.0"))
    out.update(_transformer("middle_block.1", "mid.1", depth))
    out.update(_res("middle_block.2", "mid.2"))
    for k in range(levels * (r + 1)):
        out.update(_res(f"output_blocks.{k}.0", f"up.{k}.0"))
        out.update(_transformer(f"output_blocks.{k}.1", f"up.{k}.1", depth))
        out.update({f"output_blocks.{k}.{j}.conv.{p}": f"up.{k}.{j}.conv.{p}" for j in (1, 2)
                    for p in ("weight", "bias")})
    return out


def ldm_unet_config(state: dict[str, torch.Tensor]) -> UNetConfig:
    """The U-Net's config read from its weights (no prefix); a :class:`ConversionError` when a key
    it needs is not there."""
    try:
        conv_in = state["input_blocks.0.0.weight"]
        mc, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
        out_channels = int(state["out.2.weight"].shape[0])
    except KeyError as err:
        raise ConversionError(f"not a latent-diffusion U-Net: {err.args[0]} is missing") from None
    blocks = sorted({int(m.group(1)) for key in state if (m := re.match(r"input_blocks\.(\d+)\.", key))})
    widths, attention, level, count, per_level = [], set(), 0, 0, []
    for b in blocks[1:]:
        if f"input_blocks.{b}.0.op.weight" in state:
            per_level.append(count)
            level, count = level + 1, 0
            continue
        if len(widths) <= level:
            widths.append(int(state[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0]))
        if f"input_blocks.{b}.1.proj_in.weight" in state:
            attention.add(level)
        count += 1
    per_level.append(count)
    if len(set(per_level)) != 1 or any(w % mc for w in widths):
        raise ConversionError(f"an irregular U-Net (res blocks per level {per_level}, widths {widths}) is not a "
                              "Stable Diffusion 1.x / 2.x U-Net")
    depth = len({m.group(1) for key in state if (m := re.match(r"middle_block\.1\.transformer_blocks\.(\d+)\.", key))})
    cross = state.get("middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    if cross is None:
        raise ConversionError("this U-Net has no cross-attention: not a Stable Diffusion 1.x / 2.x U-Net")
    linear = state["middle_block.1.proj_in.weight"].ndim == 2  # SD 2.x
    heads = tuple(w // 64 if linear else 8 for w in widths)
    return UNetConfig(in_channels=in_channels, out_channels=out_channels, model_channels=mc,
                      channel_mult=tuple(w // mc for w in widths), num_res_blocks=per_level[0],
                      attention_levels=tuple(sorted(attention)), head_dim=widths[0] // heads[0], num_heads=heads,
                      transformer_depth=depth, context_dim=int(cross.shape[1]), norm_groups=32, norm_eps=1e-5,
                      transformer_norm_eps=1e-6, layer_norm_eps=1e-5, attention_bias=False, time_mode="additive",
                      mid_attention_norm=True, time_cos_first=True, time_freq_shift=0.0)


def ldm_vae_key_map(config: VAEConfig) -> dict[str, str]:
    """Latent diffusion's autoencoder weight name (without the prefix) -> difflab's."""
    out: dict[str, str] = {}

    def pair(src: str, dst: str) -> None:
        out.update({f"{src}.{p}": f"{dst}.{p}" for p in ("weight", "bias")})

    def res(src: str, dst: str) -> None:
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                     ("nin_shortcut", "skip")):
            pair(f"{src}.{a}", f"{dst}.{b}")

    def middle(side: str, k: int) -> int:
        res(f"{side}.mid.block_1", f"{side}.{k}")
        k += 1
        if config.mid_attention:
            pair(f"{side}.mid.attn_1.norm", f"{side}.{k}.norm")
            for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out")):
                pair(f"{side}.mid.attn_1.{a}", f"{side}.{k}.blocks.0.attn1.{b}")
            k += 1
        res(f"{side}.mid.block_2", f"{side}.{k}")
        return k + 1

    levels, r = len(config.channel_mult), config.num_res_blocks
    pair("encoder.conv_in", "encoder.0")
    k = 1
    for level in range(levels):
        for j in range(r):
            res(f"encoder.down.{level}.block.{j}", f"encoder.{k}")
            k += 1
        if level != levels - 1:
            pair(f"encoder.down.{level}.downsample.conv", f"encoder.{k}.conv")
            k += 1
    k = middle("encoder", k)
    pair("encoder.norm_out", f"encoder.{k}")
    pair("encoder.conv_out", f"encoder.{k + 2}")
    pair("decoder.conv_in", "decoder.0")
    k = middle("decoder", 1)
    for level in reversed(range(levels)):  # latent diffusion numbers the decoder's levels like the encoder's
        for j in range(r + 1):
            res(f"decoder.up.{level}.block.{j}", f"decoder.{k}")
            k += 1
        if level:
            pair(f"decoder.up.{level}.upsample.conv", f"decoder.{k}.conv")
            k += 1
    pair("decoder.norm_out", f"decoder.{k}")
    pair("decoder.conv_out", f"decoder.{k + 2}")
    pair("quant_conv", "quant")
    pair("post_quant_conv", "post_quant")
    return out


def ldm_vae_config(state: dict[str, torch.Tensor]) -> VAEConfig:
    try:
        conv_in = state["encoder.conv_in.weight"]
        latent = int(state["post_quant_conv.weight"].shape[0])
    except KeyError as err:
        raise ConversionError(f"not a latent-diffusion autoencoder: {err.args[0]} is missing") from None
    levels = sorted({int(m.group(1)) for key in state if (m := re.match(r"encoder\.down\.(\d+)\.", key))})
    widths = [int(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in levels]
    r = len({m.group(1) for key in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", key))})
    base = int(conv_in.shape[0])
    return VAEConfig(in_channels=int(conv_in.shape[1]), latent_channels=latent, base_channels=base,
                     channel_mult=tuple(w // base for w in widths), num_res_blocks=r,
                     mid_attention="encoder.mid.attn_1.q.weight" in state, norm_groups=32, scaling_factor=SD_SCALING,
                     asymmetric_downsample=True, quant_conv=True)


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def from_single_file(path: str | os.PathLike | dict[str, torch.Tensor], *, allow_pickle: bool = False) -> SingleFile:
    """The U-Net and VAE of an original Stable Diffusion 1.x / 2.x ``.safetensors`` file (or its
    state dict); the text encoder's keys are listed in ``left`` (load CLIP from a transformers
    folder). Unknown families are refused with the keys found. A ``.ckpt`` (a pickle) is read only
    with ``allow_pickle``, by torch's restricted unpickler (no code in the file runs)."""
    if isinstance(path, dict):
        state = path
    else:
        path = Path(path)
        if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
            if not allow_pickle:
                raise ConversionError(f"{path} is a pickle ({path.suffix}); difflab reads single-file checkpoints as "
                                      ".safetensors (pass allow_pickle=True to read its tensors with torch's "
                                      "restricted unpickler, if you trust where it came from)")
            state = load_pickled_tensors(path, "a single-file checkpoint")
        else:
            state = load_tensors(path, "single-file checkpoint")
    unet_state, vae_state = _part(state, UNET_PREFIX), _part(state, VAE_PREFIX)
    if not unet_state:
        prefixes = sorted({k.split(".")[0] for k in state})[:8]
        raise ConversionError(f"no latent-diffusion U-Net ({UNET_PREFIX}...) in this file; its top-level keys are "
                              f"{prefixes}: an unknown family")
    config = ldm_unet_config(unet_state)
    unet = UNet(config)
    copy_mapped(unet, unet_state, ldm_unet_key_map(config), "the U-Net", conv_as_linear)
    vae = None
    if vae_state:
        vae_cfg = ldm_vae_config(vae_state)
        vae = VAE(vae_cfg)
        copy_mapped(vae, vae_state, ldm_vae_key_map(vae_cfg), "the VAE", conv_as_linear)
    family = "sd2" if unet_state["middle_block.1.proj_in.weight"].ndim == 2 else "sd1"
    left: dict[str, Any] = {}
    for key in state:
        if not key.startswith((UNET_PREFIX, VAE_PREFIX)):
            head = key.split(".")[0] + "."
            left[head] = left.get(head, 0) + 1
    return SingleFile(family, unet, vae, left)
