"""Procedurally drawn shapes with captions, attributes, masks and edge maps; deterministic from a seed.

Each image holds one shape of a colour, a size and a position, on a dark background, captioned
like "a small red circle at the top left". The attributes are also given as class indices, so
attribute classifiers and prompt-faithfulness metrics can be trained on them.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")


def caption(shape: str, colour: str, size: str, position: str) -> str:
    return f"a {size} {colour} {shape} at the {position}"


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption asks for (the inverse of :func:`caption`); a clear error otherwise."""
    words = text.lower().strip().rstrip(".")
    found = {
        "shape": [s for s in SHAPES if s in words],
        "colour": [c for c in COLOURS if c in words],
        "size": [z for z in SIZES if z in words],
        "position": [p for p in POSITIONS if p in words],
    }
    missing = [k for k, v in found.items() if len(v) != 1]
    if missing:
        raise ValueError(f"prompt {text!r} does not name exactly one {' / '.join(missing)}; shapes prompts read like "
                         f"{caption('circle', 'red', 'small', 'top left')!r}")
    return {k: v[0] for k, v in found.items()}


def all_captions() -> list[str]:
    """Every caption the shapes data can have (3 shapes x 4 colours x 2 sizes x 4 positions)."""
    return [caption(s, c, z, p) for s in SHAPES for c in COLOURS for z in SIZES for p in POSITIONS]


def attribute_indices(attrs: dict[str, str]) -> list[int]:
    """(shape, colour, size, position) indices, in the order of the dataset's ``attributes``."""
    return [SHAPES.index(attrs["shape"]), list(COLOURS).index(attrs["colour"]), SIZES.index(attrs["size"]),
            POSITIONS.index(attrs["position"])]


def draw(shape: str, colour: str, size: str, position: str, resolution: int = 32,
         jitter: tuple[float, float] = (0.0, 0.0)) -> tuple[Image.Image, Image.Image]:
    """(RGB image, mask) of one shape; ``jitter`` moves it within its quadrant (fractions)."""
    r = resolution
    radius = r * (0.12 if size == "small" else 0.21)
    cx = r * (0.27 if "left" in position else 0.73) + jitter[0] * r * 0.08
    cy = r * (0.27 if "top" in position else 0.73) + jitter[1] * r * 0.08
    mask = Image.new("L", (r, r), 0)
    d = ImageDraw.Draw(mask)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "square":
        d.rectangle(box, fill=255)
    else:
        d.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=255)
    image = Image.new("RGB", (r, r), (20, 20, 28))
    image.paste(Image.new("RGB", (r, r), COLOURS[colour]), mask=mask)
    return image, mask


class Shapes(Dataset):
    """``n`` shape images at ``resolution``; item ``i`` depends only on (seed, i).

    ``holdout``: attribute combinations (shape, colour) left out of this split, for measuring
    generalisation to prompts never seen together in training; ``only_holdout`` keeps just those.
    """

    def __init__(self, n: int = 4096, resolution: int = 32, seed: int = 0,
                 holdout: tuple[tuple[str, str], ...] = (), only_holdout: bool = False):
        if resolution < 16:
            raise ValueError(f"shapes need a resolution of at least 16, got {resolution}")
        self.n, self.resolution, self.seed = n, resolution, seed
        self.holdout, self.only_holdout = {tuple(h) for h in holdout}, only_holdout
        self.attributes = [self._attributes(i) for i in range(n)]

    def _attributes(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, i))
        while True:
            attrs = {"shape": SHAPES[rng.integers(len(SHAPES))], "colour": list(COLOURS)[rng.integers(len(COLOURS))],
                     "size": SIZES[rng.integers(len(SIZES))], "position": POSITIONS[rng.integers(len(POSITIONS))],
                     "jitter": (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))}
            held = (attrs["shape"], attrs["colour"]) in self.holdout
            if held == self.only_holdout or not self.holdout:
                return attrs

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        a = self.attributes[i]
        image, mask = draw(a["shape"], a["colour"], a["size"], a["position"], self.resolution, a["jitter"])
        edges = mask.filter(ImageFilter.FIND_EDGES)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        return {
            "x": x,
            "caption": caption(a["shape"], a["colour"], a["size"], a["position"]),
            "label": SHAPES.index(a["shape"]),
            "attributes": torch.tensor(attribute_indices(a)),
            "mask": torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None],
            "edges": torch.from_numpy((np.asarray(edges, dtype=np.float32) > 0).astype(np.float32))[None],
        }
