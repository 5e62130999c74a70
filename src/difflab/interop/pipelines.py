"""A diffusers pipeline folder (``model_index.json`` beside one folder per part) as a difflab
:class:`~difflab.pipeline.Pipeline`.

So far: the unconditional pixel pipelines (``DDPMPipeline``, ``DDIMPipeline``, ``PNDMPipeline``: a
``UNet2DModel`` in ``unet/`` and a scheduler) and Stable Diffusion 1.x / 2.x text-to-image folders
(``StableDiffusionPipeline``: a ``UNet2DConditionModel``, an ``AutoencoderKL``, a CLIP text encoder
and tokenizer, a scheduler; the safety checker and feature extractor are not used), Stable
Diffusion XL (two CLIP encoders) and Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``: an
``SD3Transformer2DModel``, two projected CLIP encoders and an optional T5). Every part
converts exactly (:mod:`difflab.interop.diffusers_unet`, :mod:`~difflab.interop.diffusers_unet_condition`,
:mod:`~difflab.interop.diffusers_vae`, :mod:`~difflab.interop.schedulers`; the text encoder loads
from the folder with ``transformers``, never from a hub); the pipeline then samples with every
difflab sampler, schedule, guidance method and accelerator, and ``difflab serve`` shows it. Parts
not converted (other transformers, IP-Adapter image encoders) are refused by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from difflab.files import read_json
from difflab.interop.diffusers_dit import (
    dit_diffusers_config,
    dit_from_diffusers,
    dit_to_diffusers,
    without_learned_sigma,
)
from difflab.interop.diffusers_mmdit import mmdit_from_diffusers
from difflab.interop.diffusers_unet import unet2d_diffusers_config, unet2d_from_diffusers, unet2d_to_diffusers
from difflab.interop.diffusers_unet_condition import unet2d_condition_from_diffusers
from difflab.interop.diffusers_vae import vae_diffusers_config, vae_from_diffusers, vae_to_diffusers
from difflab.interop.schedulers import ConversionError, scheduler_from_diffusers, scheduler_to_diffusers
from difflab.pipeline import Pipeline

INDEX = "model_index.json"
#: the parts difflab reads, by role, with the classes it converts (None: any scheduler it converts)
CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
CONVERTED = {"unet": ("UNet2DModel", "UNet2DConditionModel"),
             "transformer": ("SD3Transformer2DModel", "DiTTransformer2DModel"), "scheduler": None,
             "vae": ("AutoencoderKL",),
             "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"), "tokenizer": CLIP_TOKENIZERS,
             "text_encoder_2": ("CLIPTextModelWithProjection",), "tokenizer_2": CLIP_TOKENIZERS,
             "text_encoder_3": ("T5EncoderModel",), "tokenizer_3": ("T5TokenizerFast", "T5Tokenizer")}
#: parts a pipeline may carry that sampling does not use
UNUSED = ("safety_checker", "feature_extractor", "image_encoder")
#: Stable Diffusion's guidance (its pipelines' default scale) and the condition dropout it was trained with
SD_GUIDANCE = {"method": "cfg", "options": {"scale": 7.5}}
SDXL_GUIDANCE = {"method": "cfg", "options": {"scale": 5.0}}
SD3_GUIDANCE = {"method": "cfg", "options": {"scale": 7.0}}
DIT_GUIDANCE = {"method": "cfg", "options": {"scale": 4.0}}
#: what a difflab pipeline becomes in diffusers: (pipeline class, network role, network class)
EXPORTS = {"unconditional pixel U-Net": ("DDPMPipeline", "unet", "UNet2DModel"),
           "class-conditional latent DiT": ("DiTPipeline", "transformer", "DiTTransformer2DModel")}
SD_COND_DROPOUT = 0.1


def is_diffusers_pipeline(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX).is_file()


def _parts(path: Path) -> dict[str, str]:
    index: dict[str, Any] = read_json(path / INDEX, "diffusers model index")
    parts = {k: v[1] for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
             and v[1] is not None and k not in UNUSED}
    unknown = sorted(k for k in parts if k not in CONVERTED)
    if unknown:
        raise ConversionError(f"{path} is a {index.get('_class_name', 'diffusers pipeline')} with "
                              f"{', '.join(unknown)}; difflab converts {', '.join(CONVERTED)}")
    if ("unet" in parts) == ("transformer" in parts) or "scheduler" not in parts:
        raise ConversionError(f"{path}/{INDEX} must name one network (unet or transformer) and a scheduler")
    for role, name in parts.items():
        if CONVERTED[role] is not None and name not in CONVERTED[role]:
            raise ConversionError(f"{path}: its {role} is a {name}; difflab converts {', '.join(CONVERTED[role])}")
    texts = [role for role in ("text_encoder", "text_encoder_2", "text_encoder_3") if role in parts]
    conditional = parts.get("unet") == "UNet2DConditionModel" or parts.get("transformer") == "SD3Transformer2DModel"
    if bool(texts) != conditional or any((role in parts) != (role.replace("text_encoder", "tokenizer") in parts)
                                         for role in ("text_encoder", "text_encoder_2", "text_encoder_3")):
        raise ConversionError(f"{path}: a text-conditional network needs its text encoders and tokenizers, and only "
                              "it takes them")
    if parts.get("transformer") == "SD3Transformer2DModel" and texts[:2] != ["text_encoder", "text_encoder_2"]:
        raise ConversionError(f"{path}: a Stable Diffusion 3 folder needs text_encoder and text_encoder_2 (CLIP)")
    return parts


def _text_encoder(path: Path, parts: dict[str, str], image_size: tuple[int, int],
                  network_config: dict[str, Any]) -> dict[str, Any]:
    """The difflab text-encoder config of a pipeline's CLIP / SDXL / SD 3 encoders (folders only)."""
    max_tokens = int(read_json(path / "tokenizer" / "tokenizer_config.json", "tokenizer config")
                     .get("model_max_length", 77))
    folder = {role: str((path / role).resolve()) for role in parts if role.startswith(("text_encoder", "tokenizer"))}
    if parts.get("transformer") == "SD3Transformer2DModel":  # two CLIPs and (optionally) T5
        return {"name": "sd3_text", "path": folder["text_encoder"], "path_2": folder["text_encoder_2"],
                "tokenizer": folder["tokenizer"], "tokenizer_2": folder["tokenizer_2"],
                "path_3": folder.get("text_encoder_3"), "tokenizer_3": folder.get("tokenizer_3"),
                "clip_tokens": min(max_tokens, 77), "t5_tokens": 256,
                "joint_dim": int(network_config.get("joint_attention_dim", 4096))}
    if "text_encoder_2" in parts:  # SDXL: both encoders, the image size as its size conditioning
        index = read_json(path / INDEX, "diffusers model index")
        return {"name": "sdxl_clip", "path": folder["text_encoder"], "path_2": folder["text_encoder_2"],
                "tokenizer": folder["tokenizer"], "tokenizer_2": folder["tokenizer_2"], "size": list(image_size),
                "max_tokens": min(max_tokens, 77), "zero_null": bool(index.get("force_zeros_for_empty_prompt", True))}
    return {"name": "clip", "path": folder["text_encoder"], "tokenizer": folder["tokenizer"],
            "max_tokens": min(max_tokens, 77)}


def pipeline_from_diffusers(path: str | os.PathLike, *, sampler: str = "dpmpp_2m", steps: int = 20,
                            allow_pickle: bool = False) -> Pipeline:
    """A difflab pipeline from a diffusers pipeline folder, sampling by default with ``sampler`` at
    ``steps`` on the grid the scheduler's spacing names (``leading``/``trailing``/``uniform``; a
    ``steps_offset`` of a leading grid is a sampling choice and is not kept). A text pipeline's
    default guidance is CFG at diffusers' default scale (7.5 SD, 5 SDXL, 7 SD 3)."""
    path = Path(path)
    if not is_diffusers_pipeline(path):
        raise ConversionError(f"{path} is not a diffusers pipeline folder: it has no {INDEX}")
    parts = _parts(path)
    role = "transformer" if "transformer" in parts else "unet"
    convert = {"UNet2DModel": unet2d_from_diffusers, "UNet2DConditionModel": unet2d_condition_from_diffusers,
               "SD3Transformer2DModel": mmdit_from_diffusers, "DiTTransformer2DModel": dit_from_diffusers}[parts[role]]
    network = convert(path / role, allow_pickle=allow_pickle)
    classes = None
    if parts[role] == "DiTTransformer2DModel":  # a learned variance is not used: sample the mean, as DiTPipeline
        network, classes = without_learned_sigma(network), network.config.num_classes
    network_config = read_json(path / role / "config.json", "diffusers model config")
    vae = vae_from_diffusers(path / "vae", allow_pickle=allow_pickle) if "vae" in parts else None
    conversion = scheduler_from_diffusers(path / "scheduler")
    size = network_config.get("sample_size") or 32
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    factor = vae.downsampling if vae is not None else 1
    text = "text_encoder" in parts
    encoder = _text_encoder(path, parts, (height * factor, width * factor), network_config) if text else None
    guidance = DIT_GUIDANCE if classes else None
    if text:
        guidance = SD3_GUIDANCE if role == "transformer" else SDXL_GUIDANCE if "text_encoder_2" in parts else \
            SD_GUIDANCE
    return Pipeline(network, conversion.process, conversion.prediction,
                    sample_shape=(network.config.in_channels, height, width), sampler=sampler, steps=steps,
                    schedule=conversion.schedule, vae=vae, text_encoder=encoder, guidance=guidance,
                    num_classes=classes, cond_dropout=SD_COND_DROPOUT if text else None)


def pipeline_to_diffusers(pipe: Pipeline, folder: str | os.PathLike) -> Path:
    """Write a difflab pipeline as a diffusers pipeline folder where diffusers has one for it: an
    unconditional pixel U-Net as a ``DDPMPipeline``, a class-conditional latent DiT with its VAE as
    a ``DiTPipeline``, each with a ``DDPMScheduler`` for its discrete VP process (a
    :class:`ConversionError` otherwise, before anything is written). :func:`pipeline_from_diffusers`
    reads the folder back with bit-identical networks and the same process and prediction."""
    from difflab.files import write_json
    from difflab.models import DiT, UNet

    kind = None
    if isinstance(pipe.network, UNet) and pipe.vae is None and not pipe.num_classes and not pipe.text_encoder_config:
        kind = "unconditional pixel U-Net"
    elif isinstance(pipe.network, DiT) and pipe.vae is not None and pipe.num_classes and not pipe.text_encoder_config:
        kind = "class-conditional latent DiT"
    if kind is None:
        raise ConversionError(f"diffusers has a pipeline for an {' and a '.join(EXPORTS)}; this pipeline is a "
                              f"{type(pipe.network).__name__}{' with a VAE' if pipe.vae is not None else ''}"
                              f"{' with classes' if pipe.num_classes else ''}"
                              f"{' with a text encoder' if pipe.text_encoder_config else ''}. Write its networks "
                              "alone with to_diffusers(pipe.network, ...)")
    height, width = pipe.sample_shape[-2:]
    if height != width:
        raise ConversionError(f"diffusers' {EXPORTS[kind][0]} samples square images; this pipeline's are "
                              f"{height}x{width}")
    spacing = {"leading": "leading", "trailing": "trailing", "uniform": "linspace"}.get(pipe.schedule, "leading")
    scheduler = scheduler_to_diffusers(pipe.process, pipe.prediction, spacing)
    if scheduler["_class_name"] != "DDPMScheduler":
        raise ConversionError(f"diffusers' {EXPORTS[kind][0]} samples a discrete VP (DDPM) process; this pipeline's "
                              f"process is {pipe.process.name!r}")
    name, role, network_class = EXPORTS[kind]
    folder = Path(folder)
    if kind == "unconditional pixel U-Net":
        unet2d_diffusers_config(pipe.network.config, height)  # refusals before anything is written
    else:
        dit_diffusers_config(pipe.network.config)
        vae_diffusers_config(pipe.vae.config)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {role: ["diffusers", network_class], "scheduler": ["diffusers", "DDPMScheduler"]}
    if kind == "unconditional pixel U-Net":
        unet2d_to_diffusers(pipe.network, folder / role, sample_size=height)
    else:
        dit_to_diffusers(pipe.network, folder / role)
        vae_to_diffusers(pipe.vae, folder / "vae")
        parts["vae"] = ["diffusers", "AutoencoderKL"]
    (folder / "scheduler").mkdir(exist_ok=True)
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    write_json(folder / INDEX, {"_class_name": name, **parts})  # last: a half-written folder is no pipeline
    return folder


def open_pipeline(path: str | os.PathLike, device: str = "cpu", allow_pickle: bool = False) -> Pipeline:
    """A difflab pipeline folder, or a diffusers one converted (:func:`pipeline_from_diffusers`):
    what the command line, the web page and the recipes open."""
    path = Path(path)
    if is_diffusers_pipeline(path) and not (path / "pipeline.json").is_file():
        return pipeline_from_diffusers(path, allow_pickle=allow_pickle).to(device)
    return Pipeline.from_pretrained(path, device)
