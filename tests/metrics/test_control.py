"""Controllability measures: exact segmentation of scenes, mIoU and edge F1."""

import pytest
import torch

from difflab import data
from difflab.metrics.control import edge_f1, edges, mean_iou, segment


def test_segmenting_a_scene_gives_its_exact_classes_and_edges():
    scenes = data.Scenes(n=16, seed=2)
    x = torch.stack([scenes[i]["x"] for i in range(16)])
    classes = torch.stack([scenes[i]["classes"] for i in range(16)])
    assert torch.equal(segment(x), classes)
    assert mean_iou(segment(x), classes)["miou"] == 1.0
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert mean_iou(segment(noisy), classes)["miou"] > 0.98
    shifted = segment(torch.roll(x, 3, dims=-1))
    assert mean_iou(shifted, classes)["miou"] < 0.9
    own = edges(x)
    truth = torch.stack([scenes[i]["edges"][0] for i in range(16)])
    assert edge_f1(own, truth)["precision"] == 1.0 and edge_f1(own, truth)["recall"] > 0.95


def test_iou_and_f1_by_hand():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 1
    predicted = torch.zeros_like(target)
    predicted[0, :2, :3] = 1
    scores = mean_iou(predicted, target)
    assert scores["iou_1"] == pytest.approx(4 / 6) and scores["iou_0"] == pytest.approx(10 / 12)
    assert scores["miou"] == pytest.approx((4 / 6 + 10 / 12) / 2)
    a = torch.zeros(1, 8, 8)
    a[0, 2, 2] = 1
    b = torch.zeros(1, 8, 8)
    b[0, 2, 3] = 1
    assert edge_f1(a, b, tolerance=1)["f1"] == 1.0 and edge_f1(a, b, tolerance=0)["f1"] == 0.0
    with pytest.raises(ValueError, match="RGB"):
        segment(torch.zeros(1, 1, 4, 4))
