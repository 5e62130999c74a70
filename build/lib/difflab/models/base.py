"""What every difflab network shares: a config dataclass, a JSON round trip, a parameter count."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


class Network(nn.Module):
    """Base class of difflab's networks; subclasses set ``config_class`` and ``kind``."""

    config_class: ClassVar[type]
    kind: ClassVar[str]

    def __init__(self, config: Any):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @classmethod
    def from_config(cls, config: dict[str, Any] | Any) -> Network:
        """Build from a config dataclass or its dict (unknown keys are refused by name)."""
        if isinstance(config, cls.config_class):
            return cls(config)
        config = {k: v for k, v in dict(config).items() if k != "kind"}
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"{cls.__name__} config has unknown field(s) {', '.join(unknown)}; "
                             f"valid fields: {', '.join(sorted(fields))}")
        for key, value in config.items():  # JSON turns tuples into lists
            if isinstance(value, list):
                config[key] = tuple(value)
        return cls(cls.config_class(**config))

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self.config)}

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (each atomically: temporary file, rename)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}  # channels-last too
        write_atomic(directory / "config.json", json.dumps(self.to_config(), indent=1).encode())
        tmp = directory / "model.safetensors.tmp"
        save_file(tensors, tmp)
        os.replace(tmp, directory / "model.safetensors")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Network:
        """Rebuild from :meth:`save_pretrained`; weights that do not fit the config are named."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
            raise FileNotFoundError(f"{directory} holds no saved network (config.json and model.safetensors)")
        config = json.loads((directory / "config.json").read_text())
        if cls is not Network and config.get("kind") != cls.kind:
            raise ValueError(f"{directory} holds a {config.get('kind')!r} network, not a {cls.kind!r}")
        from difflab.models import from_config

        net = from_config(config)
        load_checked(net, load_file(directory / "model.safetensors"), str(directory))
        return net


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to ``path`` through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_checked(net: nn.Module, state: dict[str, Any], source: str) -> None:
    """``load_state_dict`` with an error that names missing, unexpected and mis-shaped weights."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: saved {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"wrong shapes {len(shapes)} (e.g. {'; '.join(shapes[:3])})")
        raise ValueError(f"the weights in {source} do not match the network's config: {', '.join(parts)}")
    net.load_state_dict(state)


def batch_times(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """The model time as one value per sample of ``x``."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"time must be a scalar or one value per sample ({x.shape[0]}), got {tuple(t.shape)}")
    return t


def check_image(owner: str, x: torch.Tensor, channels: int, multiple: int, unit: str) -> None:
    """Refuse an input that is not (batch, channels, H, W) with H and W divisible by ``multiple``."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{owner} expects (batch, {channels}, H, W), got {tuple(x.shape)}")
    if x.shape[-1] % multiple or x.shape[-2] % multiple:
        raise ValueError(f"{owner}: spatial size {tuple(x.shape[-2:])} is not divisible by {unit} {multiple}")


def check_conditioning(owner: str, config: Any, class_labels: Any, context: Any = None) -> None:
    """Refuse a call that leaves out the conditioning the network was built for."""
    if getattr(config, "num_classes", None) and class_labels is None:
        raise ValueError(f"this {owner} is class-conditional: pass class_labels (-1 selects the null class)")
    if getattr(config, "context_dim", None) and context is None:
        raise ValueError(f"this {owner} cross-attends to text: pass context (the null prompt's embedding for "
                         "the unconditional branch)")
