"""Small CNNs trained by difflab on its built-in data, cached after the first use.

``digits``: the digit class of 8x8 digits. ``shapes``: the four attributes of a shapes image
(shape, colour, size, position). They score whether conditional samples show what they were asked
for, and their pooled activations are domain features for Frechet distance, KID and
precision/recall with no download.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def _backbone(in_channels: int, width: int, stride2: int, norm: bool = False) -> nn.Sequential:
    """Convolutions (``stride2`` of them halving the size), then global average pooling. ``norm``
    puts a GroupNorm after each convolution: without it the shapes classifier's shape head trained
    to anywhere between 85 % and 99 % depending on the seed and thread count."""

    def conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), *([nn.GroupNorm(8, c_out)] if norm else []),
                nn.ReLU()]

    layers = conv(in_channels, width)
    for i in range(stride2):
        layers += conv(width * 2 ** i, width * 2 ** (i + 1), 2)
    c = width * 2 ** stride2
    layers += [*conv(c, c), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class DigitsClassifier(nn.Module):
    """Digit class of (N, 1, H, W) images in [-1, 1], compared at the native 8x8."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.heads = {"digit": 10}
        self.features = _backbone(1, width, 1)
        self.head = nn.Linear(2 * width, 10)

    def embed(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"digits features need (N, 1, H, W) grayscale images, got {tuple(x.shape)}")
        return self.features(_resize(x, 8))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


class ShapesClassifier(nn.Module):
    """Shape, colour, size and position of (N, 3, H, W) shapes images in [-1, 1], compared at 32x32.
    ``forward`` returns one logit tensor per attribute."""

    def __init__(self, width: int = 32):
        super().__init__()
        from difflab.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES

        self.heads = {"shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES), "position": len(POSITIONS)}
        self.features = _backbone(3, width, 2, norm=True)
        self.out = nn.Linear(4 * width, sum(self.heads.values()))

    def embed(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"shapes features need (N, 3, H, W) RGB images, got {tuple(x.shape)}")
        return self.features(_resize(x, 32))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.heads, self.out(self.embed(x)).split(list(self.heads.values()), dim=1), strict=True))


def _shift(x: Tensor, g: torch.Generator, pixels: int) -> Tensor:
    """A random translation by up to ``pixels`` (augmentation)."""
    dx, dy = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def train_digits(epochs: int = 40, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Train on the digits train split; returns the model and its test-split accuracy."""
    from difflab.data.digits import Digits

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, test = Digits("train"), Digits("test")
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i: i + 64]
            loss = F.cross_entropy(model(_shift(train.x[idx], g, 1)), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), accuracy(model, test.x, test.labels)


def shapes_tensors(n: int, seed: int, resolution: int = 32) -> tuple[Tensor, Tensor]:
    """(images, attribute indices) of ``n`` shapes images."""
    from difflab.data.shapes import Shapes

    data = Shapes(n=n, resolution=resolution, seed=seed)
    items = [data[i] for i in range(n)]
    return torch.stack([it["x"] for it in items]), torch.stack([it["attributes"] for it in items])


def train_shapes(epochs: int = 6, n: int = 6000, seed: int = 0) -> tuple[ShapesClassifier, float]:
    """Train on freshly drawn shapes (seed 1000 + seed); returns the model and its accuracy on all
    four attributes at once on 1000 other images. Light noise augmentation keeps it robust to the
    small artefacts of generated images."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, attrs = shapes_tensors(n, 1000 + seed)
    x_test, attrs_test = shapes_tensors(1000, 2000 + seed)
    model = ShapesClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 64):
            idx = perm[i: i + 64]
            xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)
            logits = model(xb)
            loss = sum(F.cross_entropy(out, attrs[idx, j]) for j, out in enumerate(logits.values()))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), float(attribute_hits(model, x_test, attrs_test).all(1).float().mean())


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Fraction of images whose predicted digit is ``labels``."""
    return float((model.eval()(images).argmax(1) == labels).float().mean())


@torch.no_grad()
def attribute_hits(model: ShapesClassifier, images: Tensor, attributes: Tensor) -> Tensor:
    """(N, 4) booleans: is each attribute of each image the one asked for."""
    logits = model.eval()(images)
    return torch.stack([out.argmax(1) for out in logits.values()], 1) == attributes


def cache_dir() -> Path:
    """Where trained helper models are kept: ``$DIFFLAB_CACHE`` or ``~/.cache/difflab``."""
    return Path(os.environ.get("DIFFLAB_CACHE", Path.home() / ".cache" / "difflab"))


@dataclass(frozen=True)
class HelperModel:
    """How a cached helper classifier is made: its network, its training function with settings, and
    the modules whose code decides the result (its cache key hashes them with the settings)."""

    build: Callable[[], nn.Module]
    train: Callable[..., tuple[nn.Module, float]]
    settings: dict[str, Any]
    data_module: str

    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode())
        for module in (__name__, self.data_module):
            digest.update(inspect.getsource(importlib.import_module(module)).encode())
        return digest.hexdigest()[:16]


HELPERS: dict[str, HelperModel] = {
    "digits": HelperModel(DigitsClassifier, train_digits, {"epochs": 40, "seed": 0}, "difflab.data.digits"),
    "shapes": HelperModel(ShapesClassifier, train_shapes, {"epochs": 6, "n": 6000, "seed": 0}, "difflab.data.shapes"),
}


def load_classifier(name: str = "digits") -> tuple[nn.Module, float]:
    """The cached classifier ``name`` with its held-out accuracy. Trained on first use (~10 s for
    digits, ~1 min for shapes) on one thread, so every machine trains the same weights; the cache
    file is keyed by the training settings and the code that produced it, so a change rebuilds it."""
    from difflab.files import FileError, load_tensors, save_tensors

    if name not in HELPERS:
        raise ValueError(f"unknown classifier {name!r}; choose one of {', '.join(HELPERS)}")
    helper = HELPERS[name]
    path = cache_dir() / f"{name}_classifier_{helper.key()}.safetensors"
    if path.is_file():
        try:
            state = load_tensors(path, f"cached {name} classifier")
            acc = float(state.pop("test_accuracy"))
            model = helper.build()
            model.load_state_dict(state)
            return model.eval(), acc
        except (FileError, KeyError, RuntimeError) as err:  # a damaged cache is rebuilt, not fatal
            warnings.warn(f"{path} is damaged ({err}); training the {name} classifier again", stacklevel=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float sums in another order would train other weights
    try:
        model, acc = helper.train(**helper.settings)
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, {**model.state_dict(), "test_accuracy": torch.tensor(acc)})
    return model, acc
