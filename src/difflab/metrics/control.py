"""Controllability: how well generated images follow a control map (ControlNet, Zhang et al. 2023;
the measures of ControlNet++, Li et al. 2024: mIoU for segmentation control, edge F1 for edges).

On difflab's scenes a generated image is segmented exactly: every object is one of four flat colours
on a plain background, so each pixel's nearest palette colour is its class — no learned segmenter
stands between the image and the score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflab.data.scenes import BACKGROUND, edges_of
from difflab.data.shapes import COLOURS

Tensor = torch.Tensor


def palette() -> Tensor:
    """(5, 3) colours in [-1, 1]: the background, then the shapes' colours (class 0, 1..4)."""
    return torch.tensor([BACKGROUND, *COLOURS.values()], dtype=torch.float32) / 127.5 - 1


def segment(images: Tensor) -> Tensor:
    """(N, 3, H, W) scenes images in [-1, 1] -> (N, H, W) colour classes (nearest palette colour)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"segmenting needs (N, 3, H, W) RGB images, got {tuple(images.shape)}")
    colours = palette().to(images.device)
    distance = ((images.float()[:, None] - colours[None, :, :, None, None]) ** 2).sum(2)
    return distance.argmin(1)


def mean_iou(predicted: Tensor, target: Tensor, num_classes: int = 1 + len(COLOURS)) -> dict[str, float]:
    """Intersection over union of two (N, H, W) class maps, per class over the whole set, and their
    mean over the classes that occur in either (``miou``)."""
    if predicted.shape != target.shape:
        raise ValueError(f"class maps of different shapes: {tuple(predicted.shape)} and {tuple(target.shape)}")
    out: dict[str, float] = {}
    ious = []
    for c in range(num_classes):
        p, t = predicted == c, target == c
        union = int((p | t).sum())
        if union:
            ious.append(int((p & t).sum()) / union)
            out[f"iou_{c}"] = ious[-1]
    out["miou"] = sum(ious) / len(ious) if ious else 1.0
    return out


def edges(images: Tensor) -> Tensor:
    """(N, H, W) edge maps of scenes images: where the segmented colour changes."""
    classes = segment(images).cpu().numpy()
    return torch.stack([torch.from_numpy(edges_of(c)) for c in classes]).float()


def edge_f1(predicted: Tensor, target: Tensor, tolerance: int = 1) -> dict[str, float]:
    """Precision, recall and F1 of (N, H, W) or (N, 1, H, W) binary edge maps, an edge pixel
    counting as matched within ``tolerance`` pixels (a square neighbourhood, as boundary benchmarks
    allow for localisation)."""
    p, t = (e.reshape(-1, 1, *e.shape[-2:]).float() for e in (predicted, target))
    if p.shape != t.shape:
        raise ValueError(f"edge maps of different shapes: {tuple(predicted.shape)} and {tuple(target.shape)}")
    k = 2 * tolerance + 1
    near_t = F.max_pool2d(t, k, 1, tolerance) > 0
    near_p = F.max_pool2d(p, k, 1, tolerance) > 0
    predicted_edges, target_edges = float(p.sum()), float(t.sum())
    precision = float((p.bool() & near_t).sum()) / predicted_edges if predicted_edges else 0.0
    recall = float((t.bool() & near_p).sum()) / target_edges if target_edges else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
