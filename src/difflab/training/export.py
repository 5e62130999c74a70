"""A training checkpoint as a pipeline, from what the checkpoint carries and nothing else.

Each checkpoint holds ``pipeline.json``: the pipeline's config (process, prediction, sampling
defaults, conditioning, text encoder), the network's config and, for a latent model, where its VAE
folder is (relative to the checkpoint, so it does not depend on the working directory). Export
reads that and the weights: it builds no dataset, no text tables and trains nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from difflab.models import Network
from difflab.models import from_config as network_from_config
from difflab.pipeline import Pipeline, PipelineError, read_config
from difflab.training import checkpoint


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a checkpoint, else the latest checkpoint of the run directory."""
    path = Path(path)
    if (path / "trainer.json").is_file():
        return path
    found = checkpoint.latest(path)
    if found is None:
        raise PipelineError(f"{path} is neither a training checkpoint nor a run directory with checkpoints "
                            "(OUT_DIR/checkpoints/step_*)")
    return found


def export(path: str | os.PathLike, *, use_ema: bool = True) -> Pipeline:
    """The pipeline of a checkpoint (or of a run directory's latest one), with the EMA weights
    unless ``use_ema=False``."""
    ckpt = find_checkpoint(path)
    if not (ckpt / "pipeline.json").is_file():
        raise PipelineError(f"{ckpt} has no pipeline.json: it was written by an older difflab. Resume the run "
                            "for one more checkpoint.")
    config = read_config(ckpt / "pipeline.json")
    network = network_from_config(config["network"])
    if use_ema and not (ckpt / "ema.safetensors").is_file():
        raise PipelineError(f"{ckpt} has no ema.safetensors (EMA weights); export the raw weights with "
                            "use_ema=False (difflab export --no-ema)")
    checkpoint.load_network(ckpt, network, ema=use_ema)
    vae = None
    if config.get("latent"):
        folder = Path(config["vae_folder"])
        folder = folder if folder.is_absolute() else (ckpt / folder)
        if not (folder / "config.json").is_file():
            raise PipelineError(f"the VAE of {ckpt} is missing: expected it at {folder.resolve()}")
        vae = Network.from_pretrained(folder)
    return Pipeline.from_parts(config, network, vae)
