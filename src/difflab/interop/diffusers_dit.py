"""diffusers ``DiTTransformer2DModel`` (Peebles & Xie 2023) and ``PixArtTransformer2DModel``
(PixArt-alpha, Chen et al. 2023) folders as difflab :class:`~difflab.models.DiT` networks with the
same outputs.

Both are DiT with adaLN-Zero; what diffusers does differently maps to options: the sin-cos position
embedding puts x before y (``sincos_order="xy"``, as the original DiT and MAE), the time features
divide by ``half - 1`` (``time_freq_shift=1``), and the LayerNorm before the MLP uses the config's
``norm_eps``. diffusers gives every block its own copy of the time and class embedding (its
``AdaLayerNormZero``) where DiT has one: the copies must be equal (they are in every converted
checkpoint), else the conversion is refused. A learned-sigma model (``out_channels = 2 x in``) keeps
its extra channels: the network is converted, not its variance.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from difflab.interop.schedulers import ConversionError
from difflab.interop.weights import (
    check_supported,
    copy_mapped,
    load_mapped,
    read_model_config,
    read_weights,
    write_mapped,
)
from difflab.models import DiT, DiTConfig


def dit_config(cfg: dict) -> DiTConfig:
    """The difflab config of a diffusers ``DiTTransformer2DModel`` config, or a :class:`ConversionError`."""
    check_supported(cfg, {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
                          "upcast_attention": False, "norm_elementwise_affine": False}, "DiTTransformer2DModel")
    heads, head_dim = int(cfg.get("num_attention_heads", 16)), int(cfg.get("attention_head_dim", 72))
    in_channels = int(cfg.get("in_channels", 4))
    classes = cfg.get("num_embeds_ada_norm") or None
    return DiTConfig(in_channels=in_channels, out_channels=int(cfg.get("out_channels") or in_channels),
                     patch_size=int(cfg.get("patch_size", 2)), hidden_size=heads * head_dim,
                     depth=int(cfg.get("num_layers", 28)), num_heads=heads, mlp_ratio=4.0, num_classes=classes,
                     conditioning="adaln_zero", position="sincos", sincos_order="xy", time_cos_first=True,
                     time_freq_shift=1.0, mlp_norm_eps=float(cfg.get("norm_eps", 1e-5)),
                     sincos_base=int(cfg.get("sample_size") or 32) // int(cfg.get("patch_size", 2)))


def dit_key_map(config: DiTConfig) -> dict[str, str]:
    """diffusers weight name -> difflab weight name (block 0's embedding stands for all blocks')."""
    pair = ("weight", "bias")
    out = {f"pos_embed.proj.{p}": f"patch.{p}" for p in pair}
    emb = "transformer_blocks.0.norm1.emb"
    out.update({f"{emb}.timestep_embedder.linear_{i + 1}.{p}": f"time_embed.mlp.{2 * i}.{p}"
                for i in (0, 1) for p in pair})
    out[f"{emb}.class_embedder.embedding_table.weight"] = "label_embed.table.weight"
    for b in range(config.depth):
        s, t = f"transformer_blocks.{b}", f"blocks.{b}"
        names = {"norm1.linear": "ada", "attn1.to_q": "attn.to_q", "attn1.to_k": "attn.to_k",
                 "attn1.to_v": "attn.to_v", "attn1.to_out.0": "attn.to_out", "ff.net.0.proj": "mlp.proj_in",
                 "ff.net.2": "mlp.proj_out"}
        out.update({f"{s}.{a}.{p}": f"{t}.{n}.{p}" for a, n in names.items() for p in pair})
    out.update({f"proj_out_1.{p}": f"ada_out.{p}" for p in pair})
    out.update({f"proj_out_2.{p}": f"proj_out.{p}" for p in pair})
    return out


def dit_from_diffusers(folder: str | os.PathLike, *, allow_pickle: bool = False) -> DiT:
    """A difflab DiT from a diffusers ``DiTTransformer2DModel`` folder; a report instead of a
    half-loaded network."""
    config = dit_config(read_model_config(folder, "DiTTransformer2DModel"))
    state = read_weights(folder, allow_pickle)
    first = "transformer_blocks.0.norm1.emb."
    for key in [k for k in state if ".norm1.emb." in k and not k.startswith(first)]:
        twin = first + key.split(".norm1.emb.", 1)[1]
        if twin not in state or not torch.equal(state[key], state[twin]):
            raise ConversionError(f"{key} differs from block 0's: diffusers gives each block its own time and "
                                  "class embedding, difflab's DiT shares one, so only equal copies convert")
        del state[key]
    return copy_mapped(DiT(config), state, dit_key_map(config), str(folder))


def without_learned_sigma(dit: DiT) -> DiT:
    """A learned-sigma DiT (``out_channels = 2 x in_channels``: the mean, then a variance
    interpolation, Nichol & Dhariwal 2021) as the DiT of its mean prediction alone: the output
    layer's variance rows are dropped, so the output is exactly the first ``in_channels`` channels
    (what diffusers' ``DiTPipeline`` samples with). Any other DiT comes back as it is."""
    c = dit.config
    if (c.out_channels or c.in_channels) != 2 * c.in_channels:
        return dit
    mean = DiT(dataclasses.replace(c, out_channels=c.in_channels))
    rows = torch.arange(dit.proj_out.out_features).remainder(2 * c.in_channels) < c.in_channels
    state = dit.state_dict()
    state["proj_out.weight"], state["proj_out.bias"] = state["proj_out.weight"][rows], state["proj_out.bias"][rows]
    mean.load_state_dict(state)
    return mean.eval()


def dit_diffusers_config(config: DiTConfig) -> dict[str, Any]:
    """The diffusers ``DiTTransformer2DModel`` config of a difflab DiT config (the inverse of
    :func:`dit_config`), or a :class:`ConversionError` naming each option diffusers cannot express."""
    c = config
    wanted = {"conditioning": "adaln_zero", "position": "sincos", "sincos_order": "xy", "time_cos_first": True,
              "time_freq_shift": 1.0, "context_dim": None, "pooled_dim": None, "long_skip": False, "qk_norm": False,
              "mlp_ratio": 4.0, "caption_projection": False, "final_modulation": "linear", "sincos_scale": 1.0}
    wrong = [f"{k}={getattr(c, k)!r} (diffusers: {v!r})" for k, v in wanted.items() if getattr(c, k) != v]
    if c.num_classes is None:
        wrong.append("num_classes=None (diffusers' DiT is class-conditional)")
    if c.sincos_base is None:
        wrong.append("sincos_base=None (diffusers rescales positions to its sample size's grid)")
    if wrong:
        raise ConversionError("this DiT cannot be written as a diffusers DiTTransformer2DModel: " + "; ".join(wrong)
                              + ". A DiT built with diffusers' conventions (those values) can.")
    return {"_class_name": "DiTTransformer2DModel", "num_attention_heads": c.num_heads,
            "attention_head_dim": c.hidden_size // c.num_heads, "in_channels": c.in_channels,
            "out_channels": c.out_channels or c.in_channels, "num_layers": c.depth,
            "sample_size": c.sincos_base * c.patch_size, "patch_size": c.patch_size,
            "num_embeds_ada_norm": c.num_classes, "norm_eps": c.mlp_norm_eps, "norm_type": "ada_norm_zero",
            "activation_fn": "gelu-approximate",
            "attention_bias": True, "upcast_attention": False, "norm_elementwise_affine": False, "dropout": 0.0}


def dit_to_diffusers(dit: DiT, folder: str | os.PathLike) -> Path:
    """Write a difflab DiT as a diffusers ``DiTTransformer2DModel`` folder (each block gets its copy
    of the shared time and class embedding, as diffusers keeps them); :func:`dit_from_diffusers`
    reads it back bit for bit."""
    mapping = dit_key_map(dit.config)
    first = "transformer_blocks.0.norm1.emb."
    copies = {mapping[k]: [k.replace("blocks.0.", f"blocks.{b}.", 1) for b in range(1, dit.config.depth)]
              for k in mapping if k.startswith(first)}
    return write_mapped(dit, folder, dit_diffusers_config(dit.config), mapping, copies)


def pixart_config(cfg: dict) -> DiTConfig:
    """The difflab config of a diffusers ``PixArtTransformer2DModel`` config, or a :class:`ConversionError`."""
    check_supported(cfg, {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
                          "upcast_attention": False, "norm_elementwise_affine": False, "norm_eps": 1e-6,
                          "attention_type": "default"}, "PixArtTransformer2DModel")
    size, patch = int(cfg.get("sample_size") or 128), int(cfg.get("patch_size", 2))
    extra = cfg.get("use_additional_conditions")
    if extra or (extra is None and size == 128):
        raise ConversionError("use_additional_conditions (PixArt-alpha 1024's resolution and aspect-ratio "
                              "embeddings) is not supported yet")
    heads, head_dim = int(cfg.get("num_attention_heads", 16)), int(cfg.get("attention_head_dim", 72))
    width = heads * head_dim
    captions = cfg.get("caption_channels")
    if captions is not None and int(cfg.get("cross_attention_dim") or width) != width:
        raise ConversionError("a caption projection to another width than the blocks' is not supported")
    in_channels = int(cfg.get("in_channels", 4))
    scale = cfg.get("interpolation_scale") or max(size // 64, 1)
    return DiTConfig(in_channels=in_channels, out_channels=int(cfg.get("out_channels") or in_channels),
                     patch_size=patch, hidden_size=width, depth=int(cfg.get("num_layers", 28)), num_heads=heads,
                     mlp_ratio=4.0, context_dim=int(captions) if captions is not None else
                     int(cfg.get("cross_attention_dim") or width), conditioning="adaln_single", position="sincos",
                     sincos_order="xy", sincos_base=size // patch, sincos_scale=float(scale),
                     caption_projection=captions is not None, cross_norm=False, final_modulation="table",
                     time_cos_first=True, time_freq_shift=0.0, mlp_norm_eps=1e-6)


def pixart_key_map(config: DiTConfig) -> dict[str, str]:
    """diffusers PixArt weight name -> difflab weight name."""
    pair = ("weight", "bias")
    out = {f"pos_embed.proj.{p}": f"patch.{p}" for p in pair}
    emb = "adaln_single.emb.timestep_embedder"
    out.update({f"{emb}.linear_{i + 1}.{p}": f"time_embed.mlp.{2 * i}.{p}" for i in (0, 1) for p in pair})
    out.update({f"adaln_single.linear.{p}": f"global_ada.{p}" for p in pair})
    out.update({f"caption_projection.linear_{i + 1}.{p}": f"caption.{2 * i}.{p}" for i in (0, 1) for p in pair})
    for b in range(config.depth):
        s, t = f"transformer_blocks.{b}", f"blocks.{b}"
        out[f"{s}.scale_shift_table"] = f"{t}.scale_shift_table"
        names = {"ff.net.0.proj": "mlp.proj_in", "ff.net.2": "mlp.proj_out"}
        for src, dst in (("attn1", "attn"), ("attn2", "cross")):
            names.update({f"{src}.{x}": f"{dst}.{x}" for x in ("to_q", "to_k", "to_v")})
            names[f"{src}.to_out.0"] = f"{dst}.to_out"
        out.update({f"{s}.{a}.{p}": f"{t}.{n}.{p}" for a, n in names.items() for p in pair})
    out["scale_shift_table"] = "final_table"
    out.update({f"proj_out.{p}": f"proj_out.{p}" for p in pair})
    return out


def pixart_from_diffusers(folder: str | os.PathLike, *, allow_pickle: bool = False) -> DiT:
    """A difflab DiT (adaLN-single, cross-attention to the caption) from a diffusers
    ``PixArtTransformer2DModel`` folder; a report instead of a half-loaded network."""
    config = pixart_config(read_model_config(folder, "PixArtTransformer2DModel"))
    return load_mapped(DiT(config), folder, pixart_key_map(config), allow_pickle=allow_pickle)
