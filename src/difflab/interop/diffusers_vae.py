"""A diffusers ``AutoencoderKL`` folder (Stable Diffusion's VAE, Rombach et al. 2022) as a difflab
:class:`~difflab.models.VAE` with the same encodings and decodings, its ``scaling_factor`` and
``shift_factor`` carried to the latents (:meth:`VAE.to_latent` / :meth:`VAE.from_latent`).

The two autoencoders are one architecture; what diffusers does differently maps to options: the
encoder's stride-2 convolutions pad only right and bottom (``asymmetric_downsample``), and 1x1
``quant_conv`` / ``post_quant_conv`` sit around the latent (``quant_conv``; SD 3's VAE has neither).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from difflab.interop.diffusers_unet import attention_key_map, resnet_key_map
from difflab.interop.schedulers import ConversionError
from difflab.interop.weights import check_supported, load_mapped, read_model_config, write_mapped
from difflab.models import VAE, VAEConfig


def vae_config(cfg: dict[str, Any]) -> VAEConfig:
    """The difflab config of a diffusers ``AutoencoderKL`` config, or a :class:`ConversionError`."""
    check_supported(cfg, {"act_fn": "silu", "norm_type": "group"}, "AutoencoderKL")
    quant = bool(cfg.get("use_quant_conv", True))
    if quant != bool(cfg.get("use_post_quant_conv", True)):
        raise ConversionError("AutoencoderKL with only one of use_quant_conv / use_post_quant_conv is not supported "
                              "(difflab's quant_conv is both or neither)")
    down, up = set(cfg.get("down_block_types", ())), set(cfg.get("up_block_types", ()))
    if down - {"DownEncoderBlock2D"} or up - {"UpDecoderBlock2D"}:
        raise ConversionError(f"block types {sorted((down - {'DownEncoderBlock2D'}) | (up - {'UpDecoderBlock2D'}))} "
                              "are not supported; difflab maps DownEncoderBlock2D and UpDecoderBlock2D")
    channels = list(cfg.get("block_out_channels", (64,)))
    base = channels[0]
    if any(c % base for c in channels):
        raise ConversionError(f"block_out_channels {channels} are not whole multiples of the first")
    if int(cfg.get("out_channels", cfg.get("in_channels", 3))) != int(cfg.get("in_channels", 3)):
        raise ConversionError("an AutoencoderKL with out_channels != in_channels is not supported")
    return VAEConfig(in_channels=int(cfg.get("in_channels", 3)), latent_channels=int(cfg.get("latent_channels", 4)),
                     base_channels=base, channel_mult=tuple(c // base for c in channels),
                     num_res_blocks=int(cfg.get("layers_per_block", 1)),
                     mid_attention=bool(cfg.get("mid_block_add_attention", True)),
                     norm_groups=int(cfg.get("norm_num_groups", 32)),
                     scaling_factor=float(cfg.get("scaling_factor") or 0.18215),
                     shift_factor=float(cfg.get("shift_factor") or 0.0), asymmetric_downsample=True, quant_conv=quant)


def vae_key_map(config: VAEConfig) -> dict[str, str]:
    """diffusers weight name -> difflab weight name."""
    out: dict[str, str] = {}

    def conv(src: str, dst: str) -> None:
        out.update({f"{src}.{p}": f"{dst}.{p}" for p in ("weight", "bias")})

    def middle(side: str, k: int) -> int:
        out.update(resnet_key_map(f"{side}.mid_block.resnets.0", f"{side}.{k}"))
        k += 1
        if config.mid_attention:
            out.update(attention_key_map(f"{side}.mid_block.attentions.0", f"{side}.{k}"))
            k += 1
        out.update(resnet_key_map(f"{side}.mid_block.resnets.1", f"{side}.{k}"))
        return k + 1

    levels, r = len(config.channel_mult), config.num_res_blocks
    conv("encoder.conv_in", "encoder.0")
    k = 1
    for b in range(levels):
        for i in range(r):
            out.update(resnet_key_map(f"encoder.down_blocks.{b}.resnets.{i}", f"encoder.{k}"))
            k += 1
        if b != levels - 1:
            conv(f"encoder.down_blocks.{b}.downsamplers.0.conv", f"encoder.{k}.conv")
            k += 1
    k = middle("encoder", k)
    conv("encoder.conv_norm_out", f"encoder.{k}")
    conv("encoder.conv_out", f"encoder.{k + 2}")
    conv("decoder.conv_in", "decoder.0")
    k = middle("decoder", 1)
    for b in range(levels):
        for i in range(r + 1):
            out.update(resnet_key_map(f"decoder.up_blocks.{b}.resnets.{i}", f"decoder.{k}"))
            k += 1
        if b != levels - 1:
            conv(f"decoder.up_blocks.{b}.upsamplers.0.conv", f"decoder.{k}.conv")
            k += 1
    conv("decoder.conv_norm_out", f"decoder.{k}")
    conv("decoder.conv_out", f"decoder.{k + 2}")
    conv("quant_conv", "quant")
    conv("post_quant_conv", "post_quant")
    return out


def vae_from_diffusers(folder: str | os.PathLike, *, allow_pickle: bool = False) -> VAE:
    """A difflab VAE from a diffusers ``AutoencoderKL`` folder; a report of unmapped, missing and
    mis-shaped weights instead of a half-loaded network."""
    config = vae_config(read_model_config(folder, "AutoencoderKL"))
    return load_mapped(VAE(config), folder, vae_key_map(config), allow_pickle=allow_pickle)


def vae_diffusers_config(config: VAEConfig) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config of a difflab VAE config (the inverse of
    :func:`vae_config`), or a :class:`ConversionError` naming what diffusers cannot express."""
    c = config
    widths = [c.base_channels * m for m in c.channel_mult]
    if not c.asymmetric_downsample:
        raise ConversionError("this VAE's stride-2 convolutions pad on every side; diffusers' AutoencoderKL pads only "
                              "right and bottom, so only a VAE built with asymmetric_downsample=True can be written")
    if any(w % c.norm_groups for w in widths):
        raise ConversionError(f"norm_groups={c.norm_groups} does not divide every width {widths}; diffusers uses one "
                              "group count everywhere")
    levels = len(widths)
    return {"_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.in_channels,
            "latent_channels": c.latent_channels, "block_out_channels": widths, "layers_per_block": c.num_res_blocks,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "act_fn": "silu", "norm_num_groups": c.norm_groups, "mid_block_add_attention": c.mid_attention,
            "scaling_factor": c.scaling_factor, "shift_factor": c.shift_factor or None,
            "use_quant_conv": c.quant_conv, "use_post_quant_conv": c.quant_conv}


def vae_to_diffusers(vae: VAE, folder: str | os.PathLike) -> Path:
    """Write a difflab VAE as a diffusers ``AutoencoderKL`` folder that diffusers loads with the same
    encodings and decodings; :func:`vae_from_diffusers` reads it back bit for bit."""
    return write_mapped(vae, folder, vae_diffusers_config(vae.config), vae_key_map(vae.config))
