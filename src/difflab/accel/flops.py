"""Counting the network's floating-point operations of a computation (PyTorch's FLOP counter:
matrix products, convolutions and attention), so accelerators report what they actually save."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` once and return (its result, the FLOPs it spent in PyTorch's counted ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())
