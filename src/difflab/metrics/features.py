"""Feature extractors for the distribution metrics, by name: ``pixels``, ``digits``, ``shapes``,
``inception``. Each maps (N, C, H, W) images in [-1, 1] to (N, D) float features."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from difflab.registry import Registry

Tensor = torch.Tensor
Extractor = Callable[[Tensor], Tensor]

INCEPTION_HELP = (
    "The standard FID network is not shipped with difflab. Download NVIDIA's inception-2015-12-05.pkl "
    "(https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/"
    "inception-2015-12-05.pkl), convert it once to TorchScript with\n"
    "  python -c \"import pickle, torch; torch.jit.save(pickle.load(open('inception-2015-12-05.pkl', 'rb')), "
    "'inception.pt')\"\n"
    "and pass its path (--inception PATH, or the DIFFLAB_INCEPTION environment variable)."
)


def pixels() -> Extractor:
    """The images themselves, flattened."""
    return lambda x: x.flatten(1).float()


def classifier_features(name: str) -> Extractor:
    """Pooled activations of difflab's ``digits`` or ``shapes`` classifier (trained once, cached)."""
    from difflab.metrics.classifiers import load_classifier

    model, _ = load_classifier(name)
    return lambda x: model.embed(x.float())


def inception(path: str | os.PathLike | None = None) -> Extractor:
    """The 2048-d pool features of the TorchScript Inception-v3 used for FID (Heusel et al. 2017), as
    in NVIDIA's StyleGAN3/EDM code: it takes uint8 images in [0, 255] of any size, resizes them to
    299x299 itself, and returns features with ``return_features=True``."""
    path = path or os.environ.get("DIFFLAB_INCEPTION")
    if not path or not Path(path).is_file():
        where = f"{path} does not exist. " if path else ""
        raise FileNotFoundError(f"inception features need the Inception-v3 weights on disk. {where}{INCEPTION_HELP}")
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format the FID network ships in
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(str(path), map_location="cpu").eval()

    def extract(x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[1] != 3:
            raise ValueError(f"inception features need 1- or 3-channel images, got {x.shape[1]} channels")
        images = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return net(images, return_features=True).float()

    return extract


REGISTRY: Registry[Callable[..., Extractor]] = Registry("feature extractor")
REGISTRY.add("pixels", pixels, "raw pixels, flattened")
REGISTRY.add("digits", lambda: classifier_features("digits"), "difflab's digits classifier, pooled features")
REGISTRY.add("shapes", lambda: classifier_features("shapes"), "difflab's shapes classifier, pooled features")
REGISTRY.add("inception", inception, "Szegedy et al. 2016 / Heusel et al. 2017 (FID's Inception-v3, local file)")


def get(name: str, **options) -> Extractor:
    """A feature extractor by name; ``inception`` takes ``path``."""
    return REGISTRY.get(name)(**options)


def from_config(config: dict) -> Extractor:
    """A feature extractor from ``{"name": ..., **options}`` (the config a metrics report records)."""
    config = dict(config)
    return get(config.pop("name", None), **config)


@torch.no_grad()
def extract(extractor: Extractor, images: Tensor, batch_size: int = 500) -> Tensor:
    """Features of many images, in batches, on the CPU."""
    return torch.cat([extractor(chunk).cpu() for chunk in images.split(batch_size)])
