"""Exponential moving average of the weights, with the warm-up that keeps early averages off the
random initialisation."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay(decay: float, updates: int, warmup: bool = True) -> float:
    """The decay of update number ``updates`` (0-based): ``min(decay, (1 + n) / (10 + n))`` with the
    warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` (also diffusers'
    ``EMAModel`` default), ``decay`` without. A fixed 0.999 from step 0 would leave 61 % of the
    initial weights in the average after 500 steps; with the warm-up it tracks the recent weights
    from the start and reaches the full decay after ``9 / (1 - decay) - 1`` updates."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def ema_model(model: nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    """An :class:`~torch.optim.swa_utils.AveragedModel` (buffers averaged too) whose decay follows
    :func:`ema_decay`; its update count is a saved buffer, so a resumed run continues exactly."""
    ema_decay(decay, 0)  # validate now, not at the first update

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # num_averaged counts the copy of the first weights as update 1; warm-up counts from there
        d = ema_decay(decay, int(num_averaged) - 1, warmup)
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (counters) follow the model
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
