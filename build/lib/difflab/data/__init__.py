"""Datasets that need no download (toy 2-D, digits, procedurally drawn shapes) and loaders for image
folders and local Hugging Face datasets. Every dataset returns dicts: ``x`` (a tensor in [-1, 1] for
images), and where it has them ``label``, ``caption``, ``mask``, ``edges``."""

from __future__ import annotations

from typing import Any

from difflab.data.digits import Digits
from difflab.data.folder import ImageFolder, hf_dataset
from difflab.data.shapes import Shapes
from difflab.data.toy import Toy2D

DATASETS = {"toy2d": Toy2D, "digits": Digits, "shapes": Shapes, "folder": ImageFolder, "hf": hf_dataset}

__all__ = ["DATASETS", "Digits", "ImageFolder", "Shapes", "Toy2D", "build", "hf_dataset"]


def build(name: str, **options: Any):
    """A dataset by name with its options (``toy2d``, ``digits``, ``shapes``, ``folder``, ``hf``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](**options)
