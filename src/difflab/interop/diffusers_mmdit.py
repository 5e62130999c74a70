"""A diffusers ``SD3Transformer2DModel`` folder (Stable Diffusion 3 and 3.5, Esser et al. 2024) as a
difflab :class:`~difflab.models.MMDiT` with the same outputs.

The weights map one to one. The sin-cos position table diffusers stores (``pos_embed.pos_embed``)
is not copied but recomputed by the network, and checked against the stored one, so a checkpoint
whose table is not the standard one is refused rather than silently changed.
"""

from __future__ import annotations

import os

import torch

from difflab.interop.schedulers import ConversionError
from difflab.interop.weights import check_supported, copy_mapped, read_model_config, read_weights
from difflab.models import MMDiT, MMDiTConfig

CLASS = "SD3Transformer2DModel"


def mmdit_config(cfg: dict) -> MMDiTConfig:
    """The difflab config of a diffusers ``SD3Transformer2DModel`` config, or a :class:`ConversionError`."""
    check_supported(cfg, {"qk_norm": "rms_norm"}, CLASS)
    heads, head_dim = int(cfg.get("num_attention_heads", 18)), int(cfg.get("attention_head_dim", 64))
    width, patch = heads * head_dim, int(cfg.get("patch_size", 2))
    if int(cfg.get("caption_projection_dim") or width) != width:
        raise ConversionError(f"{CLASS} caption_projection_dim={cfg['caption_projection_dim']} differs from the "
                              f"blocks' width {width} (heads x head dim); joint attention needs them equal")
    if cfg.get("pos_embed_max_size") is None:
        raise ConversionError(f"{CLASS} without pos_embed_max_size (a position table interpolated to each size) is "
                              "not supported; difflab maps SD 3's cropped table")
    in_channels = int(cfg.get("in_channels", 16))
    return MMDiTConfig(in_channels=in_channels, out_channels=int(cfg.get("out_channels") or in_channels),
                       patch_size=patch, hidden_size=width, depth=int(cfg.get("num_layers", 18)), num_heads=heads,
                       context_dim=int(cfg.get("joint_attention_dim", 4096)),
                       pooled_dim=int(cfg.get("pooled_projection_dim", 2048)),
                       position_grid=int(cfg["pos_embed_max_size"]),
                       sincos_base=int(cfg.get("sample_size", 128)) // patch, qk_norm=cfg.get("qk_norm") is not None,
                       dual_attention=tuple(int(i) for i in cfg.get("dual_attention_layers") or ()))


def mmdit_key_map(config: MMDiTConfig) -> dict[str, str]:
    """diffusers weight name -> difflab weight name."""
    pair = ("weight", "bias")
    names = {"pos_embed.proj": "patch", "context_embedder": "context_embed", "norm_out.linear": "norm_out.linear",
             "proj_out": "proj_out"}
    names.update({f"time_text_embed.timestep_embedder.linear_{i + 1}": f"time_embed.mlp.{2 * i}" for i in (0, 1)})
    names.update({f"time_text_embed.text_embedder.linear_{i + 1}": f"pooled_embed.proj.{2 * i}" for i in (0, 1)})
    out: dict[str, str] = {}
    for b in range(config.depth):
        s, t = f"transformer_blocks.{b}", f"blocks.{b}"
        block = {"norm1.linear": "norm_image.linear", "norm1_context.linear": "norm_text.linear",
                 "attn.to_out.0": "attn.to_out", "attn.add_q_proj": "attn.add_q", "attn.add_k_proj": "attn.add_k",
                 "attn.add_v_proj": "attn.add_v", "attn.to_add_out": "attn.to_add_out",
                 "attn2.to_out.0": "attn2.to_out", "ff.net.0.proj": "mlp.proj_in", "ff.net.2": "mlp.proj_out",
                 "ff_context.net.0.proj": "mlp_text.proj_in", "ff_context.net.2": "mlp_text.proj_out"}
        block.update({f"{a}.{x}": f"{a}.{x}" for a in ("attn", "attn2") for x in ("to_q", "to_k", "to_v")})
        names.update({f"{s}.{a}": f"{t}.{n}" for a, n in block.items()})
        norms = {"attn.norm_q": "attn.norm_q", "attn.norm_k": "attn.norm_k", "attn.norm_added_q": "attn.norm_add_q",
                 "attn.norm_added_k": "attn.norm_add_k", "attn2.norm_q": "attn2.norm_q", "attn2.norm_k": "attn2.norm_k"}
        out.update({f"{s}.{a}.weight": f"{t}.{n}.weight" for a, n in norms.items()})
    out.update({f"{src}.{p}": f"{dst}.{p}" for src, dst in names.items() for p in pair})
    return out


def mmdit_from_diffusers(folder: str | os.PathLike, *, allow_pickle: bool = False) -> MMDiT:
    """A difflab MMDiT from a diffusers ``SD3Transformer2DModel`` folder; a report instead of a
    half-loaded network."""
    config = mmdit_config(read_model_config(folder, CLASS))
    network = MMDiT(config)
    state = read_weights(folder, allow_pickle)
    table = state.pop("pos_embed.pos_embed", None)
    if table is not None and (table.shape[-2:] != network.positions.shape or not torch.allclose(
            table.reshape(network.positions.shape).float(), network.positions, atol=1e-5)):
        raise ConversionError(f"{folder}: its stored position table (pos_embed.pos_embed) is not the sin-cos table of "
                              f"a {config.position_grid}-patch grid at base {config.sincos_base}; difflab computes "
                              "that table and cannot carry another")
    return copy_mapped(network, state, mmdit_key_map(config), str(folder))
