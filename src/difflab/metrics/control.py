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


class Segmenter(torch.nn.Module):
    """A small differentiable segmenter of scenes images: (N, 3, H, W) in [-1, 1] -> (N, classes,
    H, W) logits. ControlNet++'s reward model (Li et al. 2024): trained on scenes (with noise, so it
    also reads imperfect generated images), it gives the cycle-consistency loss a gradient; the
    measures above stay exact and do not use it."""

    def __init__(self, classes: int = 1 + len(COLOURS), width: int = 32):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, classes, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.body(images)


def train_segmenter(images: Tensor, classes: Tensor, *, steps: int = 600, batch_size: int = 64, lr: float = 2e-3,
                    noise: float = 0.3, seed: int = 0) -> Segmenter:
    """A :class:`Segmenter` fitted to scenes ``images`` and their ``classes`` maps (noise of up to
    ``noise`` standard deviation and a light blur added, so it generalises to generated images)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Segmenter().to(images.device)
    optimizer = torch.optim.Adam(model.parameters(), lr)
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = images[idx]
        if bool(torch.rand((), generator=g) < 0.5):
            x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
        scale = noise * torch.rand(batch_size, 1, 1, 1, generator=g)
        x = x + scale.to(x.device) * torch.randn(x.shape, generator=g).to(x.device)
        loss = F.cross_entropy(model(x), classes[idx].to(x.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)
