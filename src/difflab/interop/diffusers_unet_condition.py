"""A diffusers ``UNet2DConditionModel`` folder (Stable Diffusion 1.x / 2.x) as a difflab
:class:`~difflab.models.UNet` with text cross-attention and the same outputs.

Latent diffusion's U-Net (Rombach et al. 2022) is difflab's U-Net with ``context_dim``: resnets with
additive time, a transformer block (GroupNorm, input projection, self-attention, cross-attention,
GEGLU feed-forward, output projection) after the resnets of the attention levels and in the middle.
What diffusers names differently maps to options: ``attention_head_dim`` is the number of heads per
level here (``num_heads``), the q/k/v projections have no bias (``attention_bias=False``), the
transformer's GroupNorm and LayerNorm epsilons are fixed at 1e-6 and 1e-5, and a 1x1-convolution
``proj_in``/``proj_out`` (``use_linear_projection=False``, SD 1.x) is the same linear map on the
tokens. SDXL's ``text_time`` added embeddings map to the pooled embedding with ``time_ids``; a latent
consistency model's ``time_cond_proj_dim`` to ``guidance_projection_dim`` (forward's
``guidance_scale``, as the LCM pipeline's ``w = scale - 1``). Class embeddings, other added
embeddings and the rarer attention variants are refused by name.
"""

from __future__ import annotations

import os
from typing import Any

from difflab.interop.diffusers_unet import unet_blocks_key_map
from difflab.interop.schedulers import ConversionError
from difflab.interop.weights import check_supported, conv_as_linear, load_mapped, read_model_config
from difflab.models import UNet, UNetConfig

DOWN = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
UP = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
#: keys difflab's U-Net expresses at one value only (key -> that value; None: unset)
SUPPORTED = {"center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
           "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
           "num_class_embeds": None,
           "encoder_hid_dim": None, "encoder_hid_dim_type": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
           "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
           "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
           "timestep_post_act": None, "cross_attention_norm": None, "attention_type": "default",
           "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
           "reverse_transformer_layers_per_block": None, "act_fn": "silu", "downsample_padding": 1,
           "mid_block_scale_factor": 1}


def _per_level(value: Any, levels: int, what: str) -> list[int]:
    values = list(value) if isinstance(value, list | tuple) else [value] * levels
    if len(values) != levels:
        raise ConversionError(f"{what} gives {len(values)} values for {levels} levels")
    return [int(v) for v in values]


def unet2d_condition_config(cfg: dict[str, Any]) -> UNetConfig:
    """The difflab config of a diffusers ``UNet2DConditionModel`` config, or a :class:`ConversionError`."""
    check_supported(cfg, SUPPORTED, "UNet2DConditionModel")
    channels = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    mc = channels[0]
    if any(c % mc for c in channels):
        raise ConversionError(f"block_out_channels {channels} are not whole multiples of the first")
    down = list(cfg.get("down_block_types", ()))
    up = list(cfg.get("up_block_types", ()))
    unknown = [b for b in down if b not in DOWN] + [b for b in up if b not in UP]
    if unknown:
        raise ConversionError(f"block type(s) {', '.join(unknown)} are not supported; difflab maps "
                              f"{', '.join([*DOWN, *UP])}")
    levels = tuple(i for i, b in enumerate(down) if DOWN[b])
    if tuple(len(up) - 1 - i for i, b in enumerate(up) if UP[b])[::-1] != levels:
        raise ConversionError(f"attention in the up blocks {up} does not mirror the down blocks {down}")
    n = len(channels)
    heads = _per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim") or 8, n,
                       "attention_head_dim (heads per level)")
    for level in (*levels, n - 1):
        if channels[level] % heads[level]:
            raise ConversionError(f"width {channels[level]} is not divisible by {heads[level]} heads")
    depths = _per_level(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    depth: int | tuple[int, ...] = depths[0] if len(set(depths)) == 1 else tuple(depths)
    added = cfg.get("addition_embed_type")
    pooled_dim, time_ids, time_dim = None, 0, 256
    if added == "text_time":  # SDXL: the pooled text and 6 size/crop numbers, embedded and added to the time
        time_dim = int(cfg.get("addition_time_embed_dim") or 256)
        width = int(cfg.get("projection_class_embeddings_input_dim") or 0)
        time_ids = 6
        pooled_dim = width - time_ids * time_dim
        if pooled_dim <= 0:
            raise ConversionError(f"projection_class_embeddings_input_dim={width} leaves no room for the pooled text "
                                  f"beside {time_ids} x {time_dim} time-id features")
    elif added is not None:
        raise ConversionError(f"UNet2DConditionModel addition_embed_type={added!r} is not supported yet (difflab "
                              "maps 'text_time', SDXL's)")
    if isinstance(cfg.get("layers_per_block"), list):
        raise ConversionError("a list-valued layers_per_block is not supported")
    context = cfg.get("cross_attention_dim", 1280)
    if isinstance(context, list):
        raise ConversionError("a list-valued cross_attention_dim is not supported")
    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)), model_channels=mc,
        channel_mult=tuple(c // mc for c in channels), num_res_blocks=int(cfg.get("layers_per_block", 2)),
        attention_levels=levels, head_dim=channels[0] // heads[0], num_heads=tuple(heads),
        transformer_depth=depth, context_dim=int(context), pooled_dim=pooled_dim, pooled_time_ids=time_ids,
        pooled_time_dim=time_dim, norm_groups=int(cfg.get("norm_num_groups", 32)),
        norm_eps=float(cfg.get("norm_eps", 1e-5)), transformer_norm_eps=1e-6, layer_norm_eps=1e-5,
        attention_bias=False, time_cos_first=bool(cfg.get("flip_sin_to_cos", True)),
        time_freq_shift=float(cfg.get("freq_shift", 0)), time_mode="additive", mid_attention_norm=True,
        channels_last=True, guidance_embedding=bool(cfg.get("time_cond_proj_dim")),
        guidance_projection_dim=cfg.get("time_cond_proj_dim") or None)


def _transformer(src: str, dst: str, depth: int) -> dict[str, str]:
    out = {f"{src}.{a}.{p}": f"{dst}.{a}.{p}" for a in ("norm", "proj_in", "proj_out") for p in ("weight", "bias")}
    for d in range(depth):
        s, t = f"{src}.transformer_blocks.{d}", f"{dst}.blocks.{d}"
        names = {"norm1": "norm1", "norm2": "norm2", "norm3": "norm3", "ff.net.0.proj": "ff.proj_in",
                 "ff.net.2": "ff.proj_out"}
        for attn in ("attn1", "attn2"):
            names.update({f"{attn}.to_q": f"{attn}.to_q", f"{attn}.to_k": f"{attn}.to_k",
                          f"{attn}.to_v": f"{attn}.to_v", f"{attn}.to_out.0": f"{attn}.to_out"})
        out.update({f"{s}.{a}.{p}": f"{t}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")})
    return out


def unet2d_condition_key_map(config: UNetConfig) -> dict[str, str]:
    """diffusers weight name -> difflab weight name (a superset: names a given model lacks included)."""
    depth = config.transformer_depth if isinstance(config.transformer_depth, int) else max(config.transformer_depth)
    out = unet_blocks_key_map(config, lambda src, dst: _transformer(src, dst, depth))  # names of absent blocks drop
    out.update({f"add_embedding.linear_{i + 1}.{p}": f"pooled_embed.proj.{2 * i}.{p}" for i in (0, 1)
                for p in ("weight", "bias")})
    out["time_embedding.cond_proj.weight"] = "guidance_proj.weight"
    return out


def unet2d_condition_from_diffusers(folder: str | os.PathLike, *, allow_pickle: bool = False) -> UNet:
    """A difflab U-Net from a diffusers ``UNet2DConditionModel`` folder; a report of unmapped, missing
    and mis-shaped weights instead of a half-loaded network."""
    config = unet2d_condition_config(read_model_config(folder, "UNet2DConditionModel"))
    return load_mapped(UNet(config), folder, unet2d_condition_key_map(config), adapt=conv_as_linear,
                       allow_pickle=allow_pickle)
