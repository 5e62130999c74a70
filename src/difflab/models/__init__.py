"""Networks: U-Net, DiT, MMDiT, MLP and the VAE, on shared layers (``layers.py``)."""

from __future__ import annotations

from typing import Any

from difflab.models.base import Network
from difflab.models.dit import DiT, DiTConfig
from difflab.models.mlp import MLP, MLPConfig
from difflab.models.mmdit import MMDiT, MMDiTConfig
from difflab.models.unet import UNet, UNetConfig
from difflab.models.vae import VAE, VAEConfig
from difflab.registry import Registry

REGISTRY: Registry[type[Network]] = Registry("network")
REGISTRY.add("unet", UNet, "Ronneberger et al. 2015; Dhariwal & Nichol 2021 (ADM U-Net)")
REGISTRY.add("dit", DiT, "Peebles & Xie 2023, Scalable Diffusion Models with Transformers")
REGISTRY.add("mmdit", MMDiT, "Esser et al. 2024, Scaling Rectified Flow Transformers (SD 3's MMDiT)")
REGISTRY.add("mlp", MLP, "a residual MLP for low-dimensional data")
REGISTRY.add("vae", VAE, "Kingma & Welling 2014; Rombach et al. 2022 (KL autoencoder)")

__all__ = [
    "MLP",
    "REGISTRY",
    "VAE",
    "DiT",
    "DiTConfig",
    "MLPConfig",
    "MMDiT",
    "MMDiTConfig",
    "Network",
    "UNet",
    "UNetConfig",
    "VAEConfig",
    "from_config",
]


def from_config(config: dict[str, Any]) -> Network:
    """Build any difflab network from ``net.to_config()``."""
    return REGISTRY.get(config.get("kind")).from_config(config)
