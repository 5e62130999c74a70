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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from difflab.interop.schedulers import ConversionError
from difflab.interop.weights import check_supported, load_mapped, read_model_config, write_mapped
from difflab.models import UNet, UNetConfig

SUPPORTED_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
SUPPORTED_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
#: marks a UNet2DModel config written by difflab: its last class embedding is the null class
NULL_CLASS_KEY = "_difflab_null_class"  # diffusers ignores keys that start with _
SUPPORTED = {"center_input_sample": False, "time_embedding_type": "positional", "add_attention": True,
             "class_embed_type": None, "downsample_type": "conv", "upsample_type": "conv", "downsample_padding": 1,
             "act_fn": "silu", "mid_block_scale_factor": 1}


def unet2d_config(cfg: dict[str, Any]) -> UNetConfig:
    """The difflab config of a diffusers ``UNet2DModel`` config, or a :class:`ConversionError`."""
    check_supported(cfg, SUPPORTED, "UNet2DModel")
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
    num_classes = None
    if cfg.get("num_class_embeds"):
        if not cfg.get(NULL_CLASS_KEY):
            raise ConversionError("num_class_embeds: this class-conditional UNet2DModel has no null class, which "
                                  "difflab's label embedding keeps for guidance (only U-Nets exported by difflab, "
                                  f"marked {NULL_CLASS_KEY}, map so far)")
        num_classes = int(cfg["num_class_embeds"]) - 1
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ConversionError(f"resnet_time_scale_shift={shift!r} is not supported")
    groups = int(cfg.get("norm_num_groups", 32))
    mid_groups = cfg.get("attn_norm_num_groups")
    if mid_groups is not None and int(mid_groups) != groups:
        raise ConversionError(f"attn_norm_num_groups={mid_groups} differs from norm_num_groups={groups}; difflab's "
                              "middle attention norm uses the U-Net's group count")
    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)), model_channels=mc,
        channel_mult=tuple(c // mc for c in channels), num_res_blocks=int(cfg.get("layers_per_block", 2)),
        attention_levels=levels, head_dim=int(head), norm_groups=groups, num_classes=num_classes,
        norm_eps=float(cfg.get("norm_eps", 1e-5)), time_cos_first=bool(cfg.get("flip_sin_to_cos", True)),
        time_freq_shift=float(cfg.get("freq_shift", 0)),
        time_mode="additive" if shift == "default" else "scale_shift",
        mid_attention_norm=shift == "default" or mid_groups is not None,
        channels_last=True)


def resnet_key_map(src: str, dst: str) -> dict[str, str]:
    """diffusers ResnetBlock2D weight names -> difflab ResBlock names (both U-Net classes share them)."""
    names = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "emb", "norm2": "norm2", "conv2": "conv2",
             "conv_shortcut": "skip"}
    return {f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def attention_key_map(src: str, dst: str) -> dict[str, str]:
    """diffusers Attention (group norm, q/k/v/out) names -> difflab's attention block (ADM's) names."""
    names = {"group_norm": "norm", "to_q": "blocks.0.attn1.to_q", "to_k": "blocks.0.attn1.to_k",
             "to_v": "blocks.0.attn1.to_v", "to_out.0": "blocks.0.attn1.to_out"}
    return {f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def unet_blocks_key_map(config: UNetConfig, attention: Callable[[str, str], dict[str, str]]) -> dict[str, str]:
    """diffusers' U-Net layout (``down_blocks``, ``mid_block``, ``up_blocks``; shared by
    ``UNet2DModel`` and ``UNet2DConditionModel``) -> difflab's names; ``attention(src, dst)`` maps one
    attention block (a plain attention or a text transformer)."""
    out = {f"conv_in.{p}": f"conv_in.{p}" for p in ("weight", "bias")}
    out.update({f"time_embedding.linear_1.{p}": f"time_embed.mlp.0.{p}" for p in ("weight", "bias")})
    out.update({f"time_embedding.linear_2.{p}": f"time_embed.mlp.2.{p}" for p in ("weight", "bias")})
    levels, r = len(config.channel_mult), config.num_res_blocks
    k = 0
    for b in range(levels):
        for i in range(r):
            out.update(resnet_key_map(f"down_blocks.{b}.resnets.{i}", f"down.{k}.0"))
            out.update(attention(f"down_blocks.{b}.attentions.{i}", f"down.{k}.1"))
            k += 1
        if b != levels - 1:
            out.update({f"down_blocks.{b}.downsamplers.0.conv.{p}": f"down.{k}.0.conv.{p}" for p in ("weight", "bias")})
            k += 1
    out.update(resnet_key_map("mid_block.resnets.0", "mid.0"))
    out.update(attention("mid_block.attentions.0", "mid.1"))
    out.update(resnet_key_map("mid_block.resnets.1", "mid.2"))
    k = 0
    for b in range(levels):
        level = levels - 1 - b
        has_attention = level in config.attention_levels
        for i in range(r + 1):
            out.update(resnet_key_map(f"up_blocks.{b}.resnets.{i}", f"up.{k}.0"))
            if has_attention:
                out.update(attention(f"up_blocks.{b}.attentions.{i}", f"up.{k}.1"))
            if level and i == r:
                index = 2 if has_attention else 1
                out.update({f"up_blocks.{b}.upsamplers.0.conv.{p}": f"up.{k}.{index}.conv.{p}"
                            for p in ("weight", "bias")})
            k += 1
    out.update({f"conv_norm_out.{p}": f"norm_out.{p}" for p in ("weight", "bias")})
    out.update({f"conv_out.{p}": f"conv_out.{p}" for p in ("weight", "bias")})
    return out


def unet2d_key_map(config: UNetConfig) -> dict[str, str]:
    """``UNet2DModel`` weight name -> difflab weight name (including names a given model may lack,
    such as shortcut convolutions between equal widths)."""
    return {**unet_blocks_key_map(config, attention_key_map), "class_embedding.weight": "label_embed.table.weight"}


def unet2d_from_diffusers(folder: str | os.PathLike, *, allow_pickle: bool = False) -> UNet:
    """A difflab U-Net from a diffusers ``UNet2DModel`` folder; a report of unmapped, missing and
    mis-shaped weights instead of a half-loaded network."""
    config = unet2d_config(read_model_config(folder, "UNet2DModel"))
    return load_mapped(UNet(config), folder, unet2d_key_map(config), allow_pickle=allow_pickle)


def unet2d_diffusers_config(config: UNetConfig, sample_size: int | None = None) -> dict[str, Any]:
    """The diffusers ``UNet2DModel`` config of a difflab U-Net config (the inverse of
    :func:`unet2d_config`), or a :class:`ConversionError` naming what diffusers cannot express."""
    c = config
    refusals = [(c.context_dim is not None, "context_dim (cross-attention to text) needs UNet2DConditionModel"),
                (c.pooled_dim is not None, "pooled_dim needs UNet2DConditionModel's added embeddings"),
                (c.concat_channels, "concat_channels (inpainting inputs) has no UNet2DModel option"),
                (c.step_size_embedding or c.guidance_embedding, "step-size and guidance embeddings have no "
                                                                "UNet2DModel option"),
                (c.qk_norm, "qk_norm has no UNet2DModel option"),
                (c.transformer_depth != 1, f"transformer_depth={c.transformer_depth}: UNet2DModel has one attention "
                                           "per block"),
                (c.time_embedding != "sinusoidal", f"time_embedding={c.time_embedding!r}: UNet2DModel's is "
                                                   "sinusoidal (positional)"),
                (c.time_mode == "additive" and not c.mid_attention_norm,
                 "additive time with no middle attention norm: diffusers always norms it there")]
    for refused, why in refusals:
        if refused:
            raise ConversionError(f"this U-Net cannot be written as a diffusers UNet2DModel: {why}")
    widths = [c.model_channels * m for m in c.channel_mult]
    for level in c.attention_levels:
        if widths[level] % c.head_dim or widths[level] < c.head_dim:
            raise ConversionError(f"attention at width {widths[level]} with head_dim {c.head_dim}: diffusers needs "
                                  "widths that are whole multiples of the head width")
    down = ["AttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in range(len(widths))]
    up = ["AttnUpBlock2D" if i in c.attention_levels else "UpBlock2D" for i in reversed(range(len(widths)))]
    out = {"_class_name": "UNet2DModel", "sample_size": sample_size, "in_channels": c.in_channels,
           "out_channels": c.out_channels or c.in_channels, "block_out_channels": widths, "down_block_types": down,
           "up_block_types": up, "layers_per_block": c.num_res_blocks, "attention_head_dim": c.head_dim,
           "norm_num_groups": c.norm_groups, "norm_eps": c.norm_eps, "flip_sin_to_cos": c.time_cos_first,
           "freq_shift": c.time_freq_shift, "dropout": c.dropout,
           "resnet_time_scale_shift": "default" if c.time_mode == "additive" else "scale_shift",
           "attn_norm_num_groups": c.norm_groups if (c.mid_attention_norm and c.time_mode != "additive") else None,
           "time_embedding_type": "positional", "act_fn": "silu", "center_input_sample": False,
           "downsample_padding": 1, "mid_block_scale_factor": 1, "add_attention": True}
    if c.num_classes:
        out.update({"num_class_embeds": c.num_classes + 1, NULL_CLASS_KEY: True})
    return out


def unet2d_to_diffusers(net: UNet, folder: str | os.PathLike, sample_size: int | None = None) -> Path:
    """Write a difflab U-Net as a diffusers ``UNet2DModel`` folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``) that diffusers loads with the same outputs;
    :func:`unet2d_from_diffusers` reads it back bit for bit. The class embedding keeps difflab's
    null class as its last row (``class_labels = num_classes`` is unconditional)."""
    return write_mapped(net, folder, unet2d_diffusers_config(net.config, sample_size), unet2d_key_map(net.config))
