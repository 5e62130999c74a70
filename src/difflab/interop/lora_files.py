"""Other libraries' LoRA files as difflab :class:`~difflab.adapters.LoRA` s on a converted network.

* diffusers / PEFT: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (older diffusers:
  ``<module>.lora.down.weight`` / ``lora.up.weight``) under an optional ``unet.`` or
  ``base_model.model.`` prefix; the scaling ``lora_alpha / r`` from a PEFT ``adapter_config.json``
  beside the file (or ``alpha=``), else 1.
* kohya-ss (sd-scripts, A1111, ComfyUI): ``lora_unet_<module with underscores>.lora_down.weight`` /
  ``lora_up.weight`` with a per-layer ``.alpha``.

The module names are diffusers'; they map to difflab layer names through the converter's weight
map (``unet2d_key_map``, or ``unet2d_condition_key_map`` for a text-conditioned U-Net), so a LoRA
made for a diffusers ``UNet2DModel`` or a Stable Diffusion ``UNet2DConditionModel`` runs on its
difflab U-Net; a 1x1-convolution LoRA on SD 1.x's projections becomes the linear update it is.
Keys that match no layer are listed, and nothing is loaded half-way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from difflab.adapters.lora import LoRA, LoRAError
from difflab.files import load_pickled_tensors, load_tensors, read_json
from difflab.interop.diffusers_unet import unet2d_key_map
from difflab.interop.diffusers_unet_condition import unet2d_condition_key_map

Tensor = torch.Tensor
PREFIXES = ("base_model.model.", "unet.")


def module_names(network: Any) -> dict[str, str]:
    """diffusers module name -> difflab layer name, for the layers a LoRA may update."""
    layers = network.weight_layers()
    key_map = unet2d_condition_key_map if getattr(network.config, "context_dim", None) else unet2d_key_map
    out = {}
    for source, target in key_map(network.config).items():
        if source.endswith(".weight") and target[: -len(".weight")] in layers:
            out[source[: -len(".weight")]] = target[: -len(".weight")]
    return out


def naming(tensors: dict[str, Tensor]) -> str:
    """``"kohya"`` or ``"peft"`` (diffusers too), from the keys; a clear error for anything else."""
    keys = list(tensors)
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora.down." in k or k.endswith(".lora_A.weight") for k in keys):
        return "peft"
    raise LoRAError(f"not a LoRA file difflab reads: keys like {keys[:3]} are neither diffusers/PEFT "
                    "(<module>.lora_A.weight) nor kohya (lora_unet_<module>.lora_down.weight)")


def lora_from_file(path: str | os.PathLike, network: Any, *, alpha: float | None = None,
                   allow_pickle: bool = False) -> LoRA:
    """A LoRA from a diffusers/PEFT or kohya ``.safetensors`` file (or a folder holding one and a
    PEFT ``adapter_config.json``) on ``network``, a difflab U-Net converted from a diffusers
    ``UNet2DModel`` or ``UNet2DConditionModel``. A pickled ``.bin`` is read only with
    ``allow_pickle``, by torch's restricted unpickler."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise LoRAError(f"{path} holds {len(found)} .safetensors files; name the LoRA file")
        path = found[0]
    if path.suffix != ".safetensors":
        if not allow_pickle:
            raise LoRAError(f"{path}: difflab reads LoRA files in safetensors (a .bin / .ckpt is a pickle: pass "
                            "allow_pickle=True to read its tensors with torch's restricted unpickler)")
        tensors = load_pickled_tensors(path, "LoRA weights")
    else:
        tensors = load_tensors(path, "LoRA weights")
    kind = naming(tensors)
    names = module_names(network)
    if kind == "kohya":
        return _kohya(tensors, network, names)
    config = folder / "adapter_config.json"
    if alpha is None and config.is_file():
        meta = read_json(config, "PEFT adapter config")
        alpha = float(meta.get("lora_alpha", meta.get("r", 1)))
    renamed: dict[str, Tensor] = {}
    for key, value in tensors.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        key = key.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight")
        key = key.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight",
                                                                              ".lora_B.weight")
        renamed[key] = value
    renamed = _linear_where_linear(renamed, network, names)
    rank = next(v.shape[0] for k, v in renamed.items() if k.endswith(".lora_A.weight"))
    return LoRA.from_tensors(network, renamed, alpha=alpha if alpha is not None else float(rank), names=names)


def _linear_where_linear(tensors: dict[str, Tensor], network: Any, names: dict[str, str] | None = None
                         ) -> dict[str, Tensor]:
    """1x1-convolution LoRA factors (SD 1.x's ``proj_in``/``proj_out``) as the linear factors they
    are where difflab's layer is linear."""
    layers = network.weight_layers()
    out = {}
    for key, value in tensors.items():
        module = key.rsplit(".", 2)[0]
        layer = layers.get((names or {}).get(module, module))
        if isinstance(layer, torch.nn.Linear) and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        out[key] = value
    return out


def _kohya(tensors: dict[str, Tensor], network: Any, names: dict[str, str]) -> LoRA:
    by_underscore = {"lora_unet_" + source.replace(".", "_"): target for source, target in names.items()}
    skipped = sorted({k.split(".")[0] for k in tensors if k.startswith("lora_te")})
    renamed, alphas, unknown = {}, {}, []
    for key, value in tensors.items():
        module, _, part = key.partition(".")
        if module.startswith("lora_te"):
            continue  # text-encoder layers: difflab's text encoders take no LoRA yet (listed below)
        if module not in by_underscore:
            unknown.append(module)
            continue
        target = by_underscore[module]
        if part == "alpha":
            alphas[target] = float(value)
        elif part == "lora_down.weight":
            renamed[f"{target}.lora_A.weight"] = value
        elif part == "lora_up.weight":
            renamed[f"{target}.lora_B.weight"] = value
        else:
            unknown.append(key)
    if unknown:
        raise LoRAError(f"the kohya LoRA has {len(set(unknown))} module(s) this network lacks: "
                        f"{sorted(set(unknown))[:8]}; nothing was loaded")
    if skipped:
        import warnings

        warnings.warn(f"the LoRA's {len(skipped)} text-encoder modules were not loaded (difflab's text encoders "
                      "take no LoRA)", stacklevel=3)
    renamed = _linear_where_linear(renamed, network)
    rank = next(v.shape[0] for k, v in renamed.items() if k.endswith(".lora_A.weight"))
    return LoRA.from_tensors(network, renamed, alpha=float(rank), alphas=alphas)
