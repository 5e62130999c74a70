"""Networks: U-Net, DiT, MLP and the VAE, on shared layers (``layers.py``)."""

from __future__ import annotations

from typing import Any

from difflab.models.base import Network
from difflab.models.dit import DiT, DiTConfig
from difflab.models.mlp import MLP, MLPConfig
from difflab.models.unet import UNet, UNetConfig
from difflab.models.vae import VAE, VAEConfig

NETWORKS: dict[str, type[Network]] = {cls.kind: cls for cls in (UNet, DiT, MLP, VAE)}

__all__ = [
    "MLP",
    "NETWORKS",
    "VAE",
    "DiT",
    "DiTConfig",
    "MLPConfig",
    "Network",
    "UNet",
    "UNetConfig",
    "VAEConfig",
    "from_config",
]


def from_config(config: dict[str, Any]) -> Network:
    """Build any difflab network from ``net.to_config()``."""
    kind = config.get("kind")
    if kind not in NETWORKS:
        raise ValueError(f"unknown network kind {kind!r}; choose one of {', '.join(NETWORKS)}")
    return NETWORKS[kind].from_config(config)
