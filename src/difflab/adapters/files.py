"""An adapter on disk: ``NAME.safetensors`` (its weights) beside ``NAME.json`` (its settings and
the identity of the base model it was trained on — a hash of that pipeline's weights), each written
atomically. Reading checks the format and refuses an adapter of other weights unless asked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from difflab.files import load_tensors, read_json, save_tensors, write_json


def save_adapter(directory: str | os.PathLike, name: str, fmt: str, tensors: dict[str, torch.Tensor],
                 settings: dict[str, Any], base_identity: str = "") -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / f"{name}.safetensors", tensors)
    write_json(directory / f"{name}.json", {"format": fmt, "kind": name, **settings, "base_model": base_identity})
    return directory


def read_adapter(directory: str | os.PathLike, name: str, fmt: str, what: str, error: type[Exception], *,
                 base_identity: str | None = None, allow_other_base: bool = False, hint: str = ""
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(settings, weights) of the adapter in ``directory``; an adapter trained on other weights than
    ``base_identity`` is refused unless ``allow_other_base``."""
    directory = Path(directory)
    if not (directory / f"{name}.json").is_file():
        raise error(f"{directory} holds no difflab {what} ({name}.json){hint}")
    meta = read_json(directory / f"{name}.json", f"{what} config")
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise error(f"{directory / (name + '.json')} is not a difflab {what} config")
    made_for = meta.get("base_model", "")
    if base_identity is not None and made_for and made_for != base_identity and not allow_other_base:
        raise error(f"the {what} in {directory} was trained on another model (weights {made_for}), not this one "
                    f"({base_identity}); pass allow_other_base=True (--other-base) to load it anyway")
    return meta, load_tensors(directory / f"{name}.safetensors", f"{what} weights")
