"""Reading and writing other libraries' checkpoints (diffusers folders, original Stable Diffusion
files) as difflab processes, predictions, networks and pipelines."""

from __future__ import annotations

import os
from pathlib import Path

from difflab.interop.diffusers_dit import dit_from_diffusers, dit_to_diffusers, pixart_from_diffusers
from difflab.interop.diffusers_mmdit import mmdit_from_diffusers
from difflab.interop.diffusers_unet import unet2d_from_diffusers, unet2d_to_diffusers
from difflab.interop.diffusers_unet_condition import unet2d_condition_from_diffusers
from difflab.interop.diffusers_vae import vae_from_diffusers, vae_to_diffusers
from difflab.interop.lora_files import lora_from_file
from difflab.interop.pipelines import (
    is_diffusers_pipeline,
    open_pipeline,
    pipeline_from_diffusers,
    pipeline_to_diffusers,
)
from difflab.interop.schedulers import (
    ConversionError,
    SchedulerConversion,
    scheduler_from_diffusers,
    scheduler_to_diffusers,
)
from difflab.interop.single_file import SingleFile, from_single_file

#: diffusers model classes difflab converts, by ``_class_name``
MODELS = {"UNet2DModel": unet2d_from_diffusers, "UNet2DConditionModel": unet2d_condition_from_diffusers,
          "AutoencoderKL": vae_from_diffusers, "DiTTransformer2DModel": dit_from_diffusers,
          "PixArtTransformer2DModel": pixart_from_diffusers, "SD3Transformer2DModel": mmdit_from_diffusers}


def to_diffusers(obj, path: str | os.PathLike, **options) -> Path:
    """Write a difflab network or pipeline in the diffusers layout where its architecture maps: a
    :class:`~difflab.models.UNet` as ``UNet2DModel`` (``sample_size=`` goes into its config), a
    :class:`~difflab.models.DiT` as ``DiTTransformer2DModel``, a :class:`~difflab.models.VAE` as
    ``AutoencoderKL``, a :class:`~difflab.pipeline.Pipeline` as a ``DDPMPipeline`` or ``DiTPipeline``
    folder. What diffusers cannot express is refused by name before anything is written."""
    from difflab.models import VAE, DiT, UNet
    from difflab.pipeline import Pipeline

    writers = [(UNet, unet2d_to_diffusers), (DiT, dit_to_diffusers), (VAE, vae_to_diffusers),
               (Pipeline, pipeline_to_diffusers)]
    for cls, write in writers:
        if isinstance(obj, cls):
            return write(obj, path, **options)
    raise ConversionError(f"difflab writes a U-Net, DiT, VAE or pipeline in the diffusers layout, not a "
                          f"{type(obj).__name__}")


def from_diffusers(path: str | os.PathLike, *, allow_pickle: bool = False):
    """A difflab network from a diffusers model folder (``config.json`` + safetensors weights), a
    :class:`~difflab.pipeline.Pipeline` from a pipeline folder (``model_index.json``), or a
    :class:`SchedulerConversion` from a scheduler folder. Weights are read from safetensors only,
    unless ``allow_pickle`` (then a ``.bin`` is read by torch's restricted unpickler)."""
    from difflab.files import read_json

    path = Path(path)
    if is_diffusers_pipeline(path):
        return pipeline_from_diffusers(path, allow_pickle=allow_pickle)
    if (path / "scheduler_config.json").is_file() and not (path / "config.json").is_file():
        return scheduler_from_diffusers(path)
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path} is not a diffusers model folder: it has no config.json "
                              "(nor scheduler_config.json)")
    name = read_json(path / "config.json", "diffusers model config").get("_class_name")
    if name not in MODELS:
        raise ConversionError(f"{path} holds a {name!r}; difflab converts {', '.join(MODELS)} so far")
    return MODELS[name](path, allow_pickle=allow_pickle)


__all__ = [
    "MODELS",
    "ConversionError",
    "SchedulerConversion",
    "SingleFile",
    "dit_from_diffusers",
    "dit_to_diffusers",
    "from_diffusers",
    "from_single_file",
    "is_diffusers_pipeline",
    "lora_from_file",
    "mmdit_from_diffusers",
    "open_pipeline",
    "pipeline_from_diffusers",
    "pipeline_to_diffusers",
    "pixart_from_diffusers",
    "scheduler_from_diffusers",
    "scheduler_to_diffusers",
    "to_diffusers",
    "unet2d_condition_from_diffusers",
    "unet2d_from_diffusers",
    "unet2d_to_diffusers",
    "vae_from_diffusers",
    "vae_to_diffusers",
]
