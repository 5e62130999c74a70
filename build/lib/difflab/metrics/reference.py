"""Reference image sets for the distribution metrics: a built-in dataset split or an image folder."""

from __future__ import annotations

from pathlib import Path

import torch

Tensor = torch.Tensor
BUILT_IN = ("digits:train", "digits:test", "shapes")


def load_reference(spec: str, *, n: int | None = None, shape: tuple[int, ...] | None = None) -> Tensor:
    """Images in [-1, 1] for ``spec``: ``digits:train``, ``digits:test``, ``shapes`` (a held-out
    seed), or a folder of images (resized to ``shape``'s size and channels). At most ``n`` images."""
    if spec.startswith("digits:"):
        from difflab.data import Digits

        size = shape[-1] if shape else 8
        x = Digits(spec.split(":", 1)[1], size=size).x
    elif spec == "shapes":
        from difflab.metrics.classifiers import shapes_tensors

        x, _ = shapes_tensors(n or 2000, seed=777, resolution=shape[-1] if shape else 32)
    elif Path(spec).is_dir():
        from difflab.data import ImageFolder

        data = ImageFolder(spec, resolution=shape[-1] if shape else None, channels=shape[0] if shape else 3)
        count = len(data) if n is None else min(n, len(data))
        x = torch.stack([data[i]["x"] for i in range(count)])
    else:
        raise ValueError(f"unknown reference {spec!r}: give one of {', '.join(BUILT_IN)} or a folder of images")
    return x[:n] if n is not None else x
