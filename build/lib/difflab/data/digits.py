"""scikit-learn's 8x8 handwritten digits (UCI), with labels, optionally upscaled; a fixed split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SPLITS = ("train", "test", "all")


def _load() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from err
    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1  # [-1, 1]
    return images, torch.tensor(d.target, dtype=torch.long)


class Digits(Dataset):
    """1797 grayscale digits in [-1, 1]; ``split`` train (first 80 % of a fixed shuffle) or test;
    ``size`` 8 (native) or a multiple of 8 (bilinear upscaling)."""

    num_classes = 10

    def __init__(self, split: str = "train", size: int = 8, test_fraction: float = 0.2):
        if split not in SPLITS:
            raise ValueError(f"unknown digits split {split!r}; choose one of {', '.join(SPLITS)}")
        if size % 8:
            raise ValueError(f"digits size must be a multiple of 8, got {size}")
        images, labels = _load()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        n_test = round(len(labels) * test_fraction)
        idx = {"train": order[n_test:], "test": order[:n_test], "all": order}[split]
        images, labels = images[idx], labels[idx]
        if size != 8:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        self.x, self.labels, self.split, self.size = images.clamp(-1, 1), labels, split, size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": self.labels[i]}
