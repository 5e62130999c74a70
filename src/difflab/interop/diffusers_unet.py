"""A diffusers ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) as a
difflab :class:`~difflab.models.UNet` with the same outputs.

The two U-Nets are the same architecture (Ho et al. 2020; Dhariwal & Nichol 2021) under other
names: the config maps to a :class:`~difflab.models.UNetConfig` (``block_out_channels`` to
``model_channels`` x ``channel_mult``, attention blocks to ``attention_levels``, diffusers' norm eps,
time-embedding flip and shift, and ``resnet_time_scale_shift``), and every weight to its difflab
name. What cannot be expressed is refused with the key and the reason; weights left over or
missing are listed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from difflab.files import load_tensors, read_json
from difflab.interop.schedulers import ConversionError
from difflab.models import UNet, UNetConfig

SUPPORTED_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
SUPPORTED_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
REFUSED = {"center_input_sample": False, "time_embedding_type": "positional", "add_attention": True,
           "class_embed_type": None, "num_train_timesteps": None, "dropout": None,
           "resnet_time_scale_shift": None, "attn_norm_num_groups": None, "downsample_type": "conv",
           "upsample_type": "conv", "downsample_padding": 1, "act_fn": "silu", "mid_block_scale_factor": 1}


def unet2d_config(cfg: dict[str, Any]) -> UNetConfig:
    """The difflab config of a diffusers ``UNet2DModel`` config, or a :class:`ConversionError`."""
    for key, wanted in REFUSED.items():
        if wanted is not None and key in cfg and cfg[key] != wanted and cfg[key] is not None:
            raise ConversionError(f"UNet2DModel {key}={cfg[key]!r} is not supported (difflab's U-Net has {wanted!r})")
    channels = list(cfg.get("block_out_channels", (224, 448, 672, 896)))
    mc = channels[0]
    if any(c % mc for c in channels):
        raise ConversionError(f"block_out_channels {channels} are not whole multiples of the first: difflab's "
                              "U-Net widths are model_channels x channel_mult")
    down, up = list(cfg.get("down_block_types", ())), list(cfg.get("up_block_types", ()))
    unknown = [b for b in down if b not in SUPPORTED_DOWN] + [b for b in up if b not in SUPPORTED_UP]
    if unknown:
        raise ConversionError(f"block type(s) {', '.join(unknown)} are not supported; difflab maps "
                              f"{', '.join([*SUPPORTED_DOWN, *SUPPORTED_UP])}")
    levels = tuple(i for i, b in enumerate(down) if SUPPORTED_DOWN[b])
    if tuple(len(up) - 1 - i for i, b in enumerate(up) if SUPPORTED_UP[b])[::-1] != levels:
        raise ConversionError(f"attention in the up blocks {up} does not mirror the down blocks {down}")
    head = cfg.get("attention_head_dim") or 8  # a head's width in UNet2DModel (None: diffusers uses 8)
    if cfg.get("num_class_embeds"):
        raise ConversionError("num_class_embeds (class-conditional UNet2DModel) is not mapped yet")
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ConversionError(f"resnet_time_scale_shift={shift!r} is not supported")
    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)), model_channels=mc,
        channel_mult=tuple(c // mc for c in channels), num_res_blocks=int(cfg.get("layers_per_block", 2)),
        attention_levels=levels, head_dim=int(head), norm_groups=int(cfg.get("norm_num_groups", 32)),
        norm_eps=float(cfg.get("norm_eps", 1e-5)), time_cos_first=bool(cfg.get("flip_sin_to_cos", True)),
        time_freq_shift=float(cfg.get("freq_shift", 0)),
        time_mode="additive" if shift == "default" else "scale_shift", mid_attention_norm=shift == "default",
        channels_last=True)


def _resnet(src: str, dst: str) -> dict[str, str]:
    names = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "emb", "norm2": "norm2", "conv2": "conv2",
             "conv_shortcut": "skip"}
    return {f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def _attention(src: str, dst: str) -> dict[str, str]:
    names = {"group_norm": "norm", "to_q": "blocks.0.attn1.to_q", "to_k": "blocks.0.attn1.to_k",
             "to_v": "blocks.0.attn1.to_v", "to_out.0": "blocks.0.attn1.to_out"}
    return {f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def unet2d_key_map(config: UNetConfig) -> dict[str, str]:
    """diffusers weight name -> difflab weight name (including names a given model may lack, such as
    shortcut convolutions between equal widths)."""
    out = {f"conv_in.{p}": f"conv_in.{p}" for p in ("weight", "bias")}
    out.update({f"time_embedding.linear_1.{p}": f"time_embed.mlp.0.{p}" for p in ("weight", "bias")})
    out.update({f"time_embedding.linear_2.{p}": f"time_embed.mlp.2.{p}" for p in ("weight", "bias")})
    levels, r = len(config.channel_mult), config.num_res_blocks
    k = 0
    for b in range(levels):
        for i in range(r):
            out.update(_resnet(f"down_blocks.{b}.resnets.{i}", f"down.{k}.0"))
            out.update(_attention(f"down_blocks.{b}.attentions.{i}", f"down.{k}.1"))
            k += 1
        if b != levels - 1:
            out.update({f"down_blocks.{b}.downsamplers.0.conv.{p}": f"down.{k}.0.conv.{p}" for p in ("weight", "bias")})
            k += 1
    out.update(_resnet("mid_block.resnets.0", "mid.0"))
    out.update(_attention("mid_block.attentions.0", "mid.1"))
    out.update(_resnet("mid_block.resnets.1", "mid.2"))
    k = 0
    for b in range(levels):
        level = levels - 1 - b
        has_attention = level in config.attention_levels
        for i in range(r + 1):
            out.update(_resnet(f"up_blocks.{b}.resnets.{i}", f"up.{k}.0"))
            if has_attention:
                out.update(_attention(f"up_blocks.{b}.attentions.{i}", f"up.{k}.1"))
            if level and i == r:
                index = 2 if has_attention else 1
                out.update({f"up_blocks.{b}.upsamplers.0.conv.{p}": f"up.{k}.{index}.conv.{p}"
                            for p in ("weight", "bias")})
            k += 1
    out.update({f"conv_norm_out.{p}": f"norm_out.{p}" for p in ("weight", "bias")})
    out.update({f"conv_out.{p}": f"conv_out.{p}" for p in ("weight", "bias")})
    return out


def unet2d_from_diffusers(folder: str | os.PathLike) -> UNet:
    """A difflab U-Net from a diffusers ``UNet2DModel`` folder; a report of unmapped, missing and
    mis-shaped weights instead of a half-loaded network."""
    folder = Path(folder)
    cfg = read_json(folder / "config.json", "diffusers model config")
    if cfg.get("_class_name") != "UNet2DModel":
        raise ConversionError(f"{folder} holds a {cfg.get('_class_name')!r}, not a UNet2DModel")
    config = unet2d_config(cfg)
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        found = sorted(p.name for p in folder.glob("diffusion_pytorch_model*"))
        raise ConversionError(f"{folder} has no diffusion_pytorch_model.safetensors (found {found or 'none'}); "
                              "difflab reads safetensors only (a .bin is a pickle)")
    state = load_tensors(weights, "diffusers weights")
    net = UNet(config)
    own = net.state_dict()
    mapping = {k: v for k, v in unet2d_key_map(config).items() if v in own}
    converted, unmapped = {}, []
    for key, value in state.items():
        if key in mapping:
            converted[mapping[key]] = value
        else:
            unmapped.append(key)
    missing = sorted(set(own) - set(converted) - {"label_embed.table.weight"})
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
              for k, v in converted.items() if v.shape != own[k].shape]
    if unmapped or missing or shapes:
        raise ConversionError(f"{weights} does not map onto the converted config: {len(converted)} mapped; "
                              f"unrecognised {unmapped[:5]}{' ...' if len(unmapped) > 5 else ''}; "
                              f"missing {missing[:5]}; wrong shapes {shapes[:3]}")
    with torch.no_grad():
        for key, value in converted.items():
            own[key].copy_(value)
    return net.eval()
