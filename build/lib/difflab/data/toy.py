"""Toy 2-D distributions: ring, moons, checkerboard and the analytic mixtures' exact samples."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

KINDS = ("ring", "moons", "checkerboard", "mixture")


class Toy2D(Dataset):
    """``n`` points of a 2-D distribution, deterministic from ``seed``; ``mixture`` carries the
    component group as ``label`` (the analytic ring with ``num_classes`` groups)."""

    def __init__(self, kind: str = "ring", n: int = 10000, seed: int = 0, num_classes: int = 4):
        if kind not in KINDS:
            raise ValueError(f"unknown toy distribution {kind!r}; choose one of {', '.join(KINDS)}")
        g = torch.Generator().manual_seed(seed)
        labels = torch.zeros(n, dtype=torch.long)
        if kind == "ring":
            ang = torch.rand(n, generator=g) * 2 * math.pi
            r = 1.0 + 0.05 * torch.randn(n, generator=g)
            x = torch.stack([r * ang.cos(), r * ang.sin()], 1)
        elif kind == "moons":
            labels = torch.randint(0, 2, (n,), generator=g)
            ang = torch.rand(n, generator=g) * math.pi
            x = torch.stack([ang.cos(), ang.sin()], 1)
            x[labels == 1] = torch.stack([1 - ang.cos(), 0.5 - ang.sin()], 1)[labels == 1]
            x = (x - torch.tensor([0.5, 0.25])) + 0.05 * torch.randn(n, 2, generator=g)
        elif kind == "checkerboard":
            pts = torch.rand(4 * n, 2, generator=g) * 4 - 2
            keep = ((pts[:, 0].floor() + pts[:, 1].floor()) % 2) == 0
            x = pts[keep][:n]
        else:
            from difflab.analytic import GaussianMixture

            mix = GaussianMixture.ring(num_components=8, std=0.08, num_classes=num_classes)
            labels = torch.randint(0, num_classes, (n,), generator=g)
            x = mix.sample(n, generator=g, labels=labels)
        self.x, self.labels, self.kind = x.float(), labels, kind
        self.num_classes = num_classes if kind == "mixture" else (2 if kind == "moons" else None)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": self.labels[i]}
