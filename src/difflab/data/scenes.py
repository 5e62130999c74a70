"""Scenes: one to three shapes with continuous positions, sizes and rotations (overlaps allowed),
captions naming them, and exact per-pixel control maps; deterministic from a seed.

Each scene is rasterised at pixel centres without anti-aliasing, so every pixel holds exactly the
colour of the topmost shape covering it (or the background): the control maps are the ground truth
of the image itself, and segmenting a generated image is exact (:mod:`difflab.metrics.control`).

Control maps of a scene (all (1 or 4, H, W) float tensors in [0, 1], besides the integer maps):

* ``objects``: which shape each pixel shows (0 background, 1.. in drawing order), ``classes``:
  its colour class (0 background, 1..4 in the order of :data:`difflab.data.shapes.COLOURS`);
* ``segmentation``: the colour classes one-hot (4 channels, background all zero) — the mask control;
* ``edges``: pixels where the visible shape changes (between shapes and at their outlines);
* ``distance``: a depth-like map, each visible shape's distance to its own outline, an eighth of the
  image being 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from torch.utils.data import Dataset

from difflab.data.shapes import COLOURS, SHAPES

Tensor = torch.Tensor
BACKGROUND = (20, 20, 28)
CONTROLS = ("segmentation", "edges", "distance")
#: radius range as a fraction of the image; "small" below the middle, "large" above
RADIUS = (0.12, 0.25)


def scene_caption(objects: list[dict]) -> str:
    """ "a large red circle, a small blue square and a green triangle", in drawing order."""
    words = [f"a {o['size']} {o['colour']} {o['shape']}" for o in objects]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def coverage(obj: dict, resolution: int) -> np.ndarray:
    """Which pixel centres the shape covers, (H, W) bool. ``obj`` holds the centre (``x``, ``y``)
    and ``radius`` as fractions of the image, and ``angle`` in radians."""
    r = resolution
    ys, xs = np.mgrid[0:r, 0:r].astype(np.float64) + 0.5
    dx, dy, radius = xs - obj["x"] * r, ys - obj["y"] * r, obj["radius"] * r
    if obj["shape"] == "circle":
        return dx * dx + dy * dy <= radius * radius
    cos, sin = math.cos(obj["angle"]), math.sin(obj["angle"])
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # the shape's own frame
    if obj["shape"] == "square":
        half = radius * 0.85  # about the area of the circle of the same radius
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    inside = np.ones_like(u, dtype=bool)  # equilateral triangle of circumradius `radius`
    for k in range(3):
        a = 2 * math.pi * k / 3 + math.pi / 2
        inside &= u * math.cos(a) + v * math.sin(a) <= radius / 2
    return inside


def render(objects: list[dict], resolution: int = 32) -> dict[str, np.ndarray]:
    """The image (H, W, 3 uint8) and the integer maps ``objects`` and ``classes`` of a scene."""
    ids = np.zeros((resolution, resolution), dtype=np.int64)
    for k, obj in enumerate(objects):
        ids[coverage(obj, resolution)] = k + 1
    colour_of = np.array([0] + [list(COLOURS).index(o["colour"]) + 1 for o in objects])
    classes = colour_of[ids]
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=np.uint8)
    return {"image": palette[classes], "objects": ids, "classes": classes}


def edges_of(ids: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour showing another shape (or the background): (H, W) bool."""
    out = np.zeros(ids.shape, dtype=bool)
    vertical, horizontal = ids[1:] != ids[:-1], ids[:, 1:] != ids[:, :-1]
    out[1:] |= vertical
    out[:-1] |= vertical
    out[:, 1:] |= horizontal
    out[:, :-1] |= horizontal
    return out


def distance_of(ids: np.ndarray) -> np.ndarray:
    """Each visible shape's distance to its outline, an eighth of the image = 1 (0 on the background)."""
    out = np.zeros(ids.shape, dtype=np.float64)
    for k in np.unique(ids[ids > 0]):
        inside = ids == k
        out[inside] = distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1][inside]
    return np.clip(out / (ids.shape[0] / 8), 0.0, 1.0)


def one_hot_classes(classes: Tensor) -> Tensor:
    """(N, H, W) colour classes -> (N, 4, H, W) one-hot, background all zero: the mask control."""
    return torch.stack([(classes == c + 1).float() for c in range(len(COLOURS))], 1)


class Scenes(Dataset):
    """``n`` scenes at ``resolution`` of ``min_objects``..``max_objects`` shapes; item ``i``
    depends only on (seed, i). Items: ``x`` (3, H, W) in [-1, 1], ``caption``, the control maps
    (see the module) and ``count``."""

    def __init__(self, n: int = 4096, resolution: int = 32, seed: int = 0, min_objects: int = 1,
                 max_objects: int = 3):
        if resolution < 16:
            raise ValueError(f"scenes need a resolution of at least 16, got {resolution}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
        self.n, self.resolution, self.seed = n, resolution, seed
        self.min_objects, self.max_objects = min_objects, max_objects
        self.scenes = [self._scene(i) for i in range(n)]

    def _scene(self, i: int) -> list[dict]:
        rng = np.random.default_rng((self.seed, 7, i))
        count = int(rng.integers(self.min_objects, self.max_objects + 1))
        objects = []
        for _ in range(count):
            radius = float(rng.uniform(*RADIUS))
            objects.append({
                "shape": SHAPES[rng.integers(len(SHAPES))], "colour": list(COLOURS)[rng.integers(len(COLOURS))],
                "radius": radius, "size": "small" if radius < sum(RADIUS) / 2 else "large",
                "x": float(rng.uniform(radius, 1 - radius)), "y": float(rng.uniform(radius, 1 - radius)),
                "angle": float(rng.uniform(0, 2 * math.pi))})
        return objects

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        drawn = render(self.scenes[i], self.resolution)
        ids = drawn["objects"]
        classes = torch.from_numpy(drawn["classes"])
        return {
            "x": torch.from_numpy(drawn["image"].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1,
            "caption": scene_caption(self.scenes[i]),
            "count": len(self.scenes[i]),
            "objects": torch.from_numpy(ids),
            "classes": classes,
            "segmentation": one_hot_classes(classes[None])[0],
            "edges": torch.from_numpy(edges_of(ids).astype(np.float32))[None],
            "distance": torch.from_numpy(distance_of(ids).astype(np.float32))[None],
        }

    def controls(self, kind: str, indices: range | list[int] | None = None) -> Tensor:
        """The control images of ``kind`` (segmentation, edges, distance) of the given items."""
        if kind not in CONTROLS:
            raise ValueError(f"scenes have no {kind!r} control; they have: {', '.join(CONTROLS)}")
        indices = range(self.n) if indices is None else indices
        return torch.stack([self[i][kind] for i in indices])
