"""Datasets that need no download (toy 2-D, digits, procedurally drawn shapes) and loaders for image
folders and local Hugging Face datasets. Every dataset returns dicts: ``x`` (a tensor in [-1, 1] for
images), and where it has them ``label``, ``caption``, ``mask``, ``edges``."""

from __future__ import annotations

from typing import Any

from difflab.data.digits import Digits
from difflab.data.folder import ImageFolder, hf_dataset
from difflab.data.scenes import Scenes
from difflab.data.shapes import Shapes
from difflab.data.toy import Toy2D
from difflab.registry import Registry

REGISTRY: Registry = Registry("dataset")
REGISTRY.add("toy2d", Toy2D, "2-D toy distributions (ring, moons, ...)")
REGISTRY.add("digits", Digits, "scikit-learn's 8x8 digits (Alpaydin & Kaynak 1998)")
REGISTRY.add("shapes", Shapes, "difflab's procedurally drawn shapes with captions, masks and edges")
REGISTRY.add("scenes", Scenes, "one to three shapes anywhere, rotated and overlapping, with exact control maps")
REGISTRY.add("folder", ImageFolder, "a folder of images, optional class subfolders and captions")
REGISTRY.add("hf", hf_dataset, "a Hugging Face dataset from local files")

__all__ = ["REGISTRY", "Digits", "ImageFolder", "Scenes", "Shapes", "Toy2D", "build", "from_config", "hf_dataset"]


def build(name: str, **options: Any):
    """A dataset by name with its options (``toy2d``, ``digits``, ``shapes``, ``folder``, ``hf``)."""
    return REGISTRY.get(name)(**options)


def from_config(config: dict[str, Any]):
    """A dataset from ``{"name": ..., **options}`` (a recipe's ``[data]`` name and options)."""
    config = dict(config)
    return build(config.pop("name", None), **config)
