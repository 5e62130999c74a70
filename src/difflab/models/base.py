"""What every difflab network shares: a config dataclass, a JSON round trip, a parameter count."""

from __future__ import annotations

import dataclasses
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


def batch_times(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """The model time as one value per sample of ``x``."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"time must be a scalar or one value per sample ({x.shape[0]}), got {tuple(t.shape)}")
    return t
