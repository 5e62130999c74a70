"""A small CNN trained by difflab on the digits training split: it scores whether class-conditional
samples show the digit they were asked for, and gives domain features with no download."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from difflab.data.digits import Digits

Tensor = torch.Tensor


class DigitsClassifier(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != 8:  # samples at other sizes are compared at the native resolution
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
        return self.head(self.features(x))


def _shift(x: Tensor, g: torch.Generator) -> Tensor:
    """Random +-1 pixel translations (augmentation)."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def train_classifier(epochs: int = 40, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Train on the train split; returns the model and its test-split accuracy."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, test = Digits("train"), Digits("test")
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i: i + 64]
            loss = F.cross_entropy(model(_shift(train.x[idx], g)), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), accuracy(model, test.x, test.labels)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    return float((model.eval()(images).argmax(1) == labels).float().mean())


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFLAB_CACHE", Path.home() / ".cache" / "difflab"))


def load_classifier() -> tuple[DigitsClassifier, float]:
    """The cached classifier (trained once, ~10 s on a CPU), with its test accuracy."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / "digits_classifier.safetensors"
    if path.is_file():
        state = load_file(path)
        acc = float(state.pop("test_accuracy"))
        model = DigitsClassifier()
        model.load_state_dict(state)
        return model.eval(), acc
    model, acc = train_classifier()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({**model.state_dict(), "test_accuracy": torch.tensor(acc)}, tmp)
    os.replace(tmp, path)
    return model, acc
