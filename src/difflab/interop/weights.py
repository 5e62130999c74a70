"""A diffusers model folder's weights loaded onto a difflab network through a name map, all or
nothing: what did not map, what is missing and what has the wrong shape is reported instead of a
half-loaded network."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from difflab.files import load_pickled_tensors, load_tensors, read_json
from difflab.interop.schedulers import ConversionError

WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_model_config(folder: str | os.PathLike, class_name: str) -> dict[str, Any]:
    """A diffusers model folder's ``config.json``, checked to hold ``class_name``."""
    folder = Path(folder)
    cfg = read_json(folder / "config.json", "diffusers model config")
    if cfg.get("_class_name") != class_name:
        raise ConversionError(f"{folder} holds a {cfg.get('_class_name')!r}, not a {class_name}")
    return cfg


def check_supported(cfg: dict[str, Any], supported: dict[str, Any], class_name: str) -> None:
    """A :class:`ConversionError` naming the first key of ``cfg`` whose value is set and is not the
    one difflab maps (``supported``: key -> that value; None means the key must be unset)."""
    for key, allowed in supported.items():
        if cfg.get(key) is not None and cfg[key] != allowed:
            raise ConversionError(f"{class_name} {key}={cfg[key]!r} is not supported yet (difflab maps "
                                  f"{key}={allowed!r})")


def conv_as_linear(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution's weight as the linear map it is on the tokens (SD 1.x's transformer
    projections, latent diffusion's VAE attention), when difflab's layer is linear."""
    return value[:, :, 0, 0] if value.ndim == 4 and target.ndim == 2 and value.shape[2:] == (1, 1) else value


def copy_mapped(network: torch.nn.Module, state: dict[str, torch.Tensor], mapping: dict[str, str], what: str,
                adapt: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.nn.Module:
    """Copy ``state`` into ``network`` through ``mapping`` (source name -> difflab name, a superset
    is fine; ``adapt(value, target)`` reshapes a value before the shape check), all or nothing."""
    own = network.state_dict()
    mapping = {k: v for k, v in mapping.items() if v in own}
    converted, unmapped = {}, []
    for key, value in state.items():
        if key not in mapping:
            unmapped.append(key)
            continue
        converted[mapping[key]] = adapt(value, own[mapping[key]]) if adapt is not None else value
    missing = sorted(set(own) - set(converted))
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in converted.items()
              if v.shape != own[k].shape]
    if unmapped or missing or shapes:
        raise ConversionError(f"{what} does not map onto the converted config: {len(converted)} mapped; "
                              f"unrecognised {unmapped[:5]}{' ...' if len(unmapped) > 5 else ''}; "
                              f"missing {missing[:5]}; wrong shapes {shapes[:3]}")
    with torch.no_grad():
        for key, value in converted.items():
            own[key].copy_(value)
    return network.eval()


def read_weights(folder: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A diffusers model folder's safetensors weights, one file or shards listed by
    ``diffusion_pytorch_model.safetensors.index.json``; a ``.bin`` (a pickle) is read only with
    ``allow_pickle`` (and then by torch's restricted unpickler, :func:`difflab.files.load_pickled_tensors`)."""
    folder = Path(folder)
    pickled = folder / "diffusion_pytorch_model.bin"
    weights, index = folder / WEIGHTS, folder / f"{WEIGHTS}.index.json"
    if weights.is_file():
        return load_tensors(weights, "diffusers weights")
    if index.is_file():
        weight_map = read_json(index, "diffusers shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index} has no weight_map (weight name -> shard file)")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_tensors(folder / shard, "diffusers weight shard"))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ConversionError(f"{index} lists weights no shard holds: {missing[:5]}")
        return state
    if allow_pickle and pickled.is_file():
        return load_pickled_tensors(pickled, "diffusers weights")
    found = sorted(p.name for p in folder.glob("diffusion_pytorch_model*"))
    raise ConversionError(f"{folder} has no {WEIGHTS} nor a shard index (found {found or 'none'}); difflab reads "
                          "safetensors (a .bin is a pickle: pass allow_pickle=True to read its tensors with torch's "
                          "restricted unpickler, if you trust where it came from)")


def load_mapped(network: torch.nn.Module, folder: str | os.PathLike, mapping: dict[str, str],
                adapt: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                allow_pickle: bool = False) -> torch.nn.Module:
    """Copy a diffusers model folder's weights into ``network`` (:func:`copy_mapped`)."""
    return copy_mapped(network, read_weights(folder, allow_pickle), mapping, str(Path(folder) / WEIGHTS), adapt)


def write_mapped(network: torch.nn.Module, folder: str | os.PathLike, config: dict[str, Any],
                 mapping: dict[str, str], copies: dict[str, list[str]] | None = None) -> Path:
    """Write ``network`` as a diffusers model folder: its weights under their diffusers names
    (``mapping``: diffusers name -> difflab name, a superset is fine; ``copies``: difflab name ->
    further diffusers names that hold the same weight) and ``config``, the config last, so a
    half-written folder has none. Every weight must have a diffusers name."""
    from difflab.files import save_tensors, write_json

    own = network.state_dict()
    inverse = {v: k for k, v in mapping.items() if v in own}
    left = sorted(set(own) - set(inverse))
    if left:
        raise ConversionError(f"these {type(network).__name__} weights have no diffusers name: {left[:5]}")
    tensors = {inverse[k]: v for k, v in own.items()}
    for key, names in (copies or {}).items():
        tensors.update({name: own[key].clone() for name in names})  # stored apart, as diffusers keeps them
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / WEIGHTS, {k: v.contiguous() for k, v in tensors.items()})
    write_json(folder / "config.json", config)
    return folder
