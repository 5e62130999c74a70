"""A diffusers pipeline folder (``model_index.json`` beside one folder per part) as a difflab
:class:`~difflab.pipeline.Pipeline`.

So far: the unconditional pixel pipelines (``DDPMPipeline``, ``DDIMPipeline``, ``PNDMPipeline``: a
``UNet2DModel`` in ``unet/`` and a scheduler in ``scheduler/``). Network and scheduler convert
exactly (:mod:`difflab.interop.diffusers_unet`, :mod:`difflab.interop.schedulers`); the pipeline
then samples with every difflab sampler, schedule and accelerator, and ``difflab serve`` shows it.
Latent, text and transformer pipelines are refused by naming the part not converted yet.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from difflab.files import read_json
from difflab.interop.diffusers_unet import unet2d_from_diffusers
from difflab.interop.schedulers import ConversionError, scheduler_from_diffusers
from difflab.pipeline import Pipeline

INDEX = "model_index.json"
#: parts of a diffusers pipeline difflab reads, by role; others are refused by name
CONVERTED = {"unet": ("UNet2DModel",), "scheduler": None}  # None: any scheduler scheduler_from_diffusers takes


def is_diffusers_pipeline(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX).is_file()


def pipeline_from_diffusers(path: str | os.PathLike, *, sampler: str = "dpmpp_2m", steps: int = 20) -> Pipeline:
    """A difflab pipeline from a diffusers pipeline folder, sampling by default with ``sampler`` at
    ``steps`` on the grid the scheduler's spacing names (``leading``/``trailing``/``uniform``; a
    ``steps_offset`` of a leading grid is a sampling choice and is not kept)."""
    path = Path(path)
    if not is_diffusers_pipeline(path):
        raise ConversionError(f"{path} is not a diffusers pipeline folder: it has no {INDEX}")
    index: dict[str, Any] = read_json(path / INDEX, "diffusers model index")
    parts = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
             and v[1] is not None}
    unknown = sorted(k for k in parts if k not in CONVERTED)
    if unknown:
        raise ConversionError(f"{path} is a {index.get('_class_name', 'diffusers pipeline')} with "
                              f"{', '.join(unknown)}; difflab converts unconditional UNet2DModel pipelines "
                              "(unet + scheduler) so far")
    for role in CONVERTED:
        if role not in parts:
            raise ConversionError(f"{path}/{INDEX} names no {role}")
    if parts["unet"][1] not in CONVERTED["unet"]:
        raise ConversionError(f"{path}: its unet is a {parts['unet'][1]}; difflab converts "
                              f"{', '.join(CONVERTED['unet'])} pipelines so far")
    network = unet2d_from_diffusers(path / "unet")
    conversion = scheduler_from_diffusers(path / "scheduler")
    cfg = read_json(path / "unet" / "config.json", "diffusers model config")
    size = cfg.get("sample_size") or 32
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return Pipeline(network, conversion.process, conversion.prediction,
                    sample_shape=(network.config.in_channels, height, width), sampler=sampler, steps=steps,
                    schedule=conversion.schedule)
