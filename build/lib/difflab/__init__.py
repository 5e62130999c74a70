"""difflab: diffusion and flow-matching models on one exact core.

Light to import: submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {"processes", "predictions", "denoiser", "analytic", "schedules", "samplers", "cli"}
_ATTRS = {"Denoiser": ("difflab.denoiser", "Denoiser"), "sample": ("difflab.samplers", "sample"),
          "GaussianMixture": ("difflab.analytic", "GaussianMixture")}

__all__ = sorted(_SUBMODULES | set(_ATTRS))


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"difflab.{name}")
    if name in _ATTRS:
        module, attr = _ATTRS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'difflab' has no attribute {name!r}")
