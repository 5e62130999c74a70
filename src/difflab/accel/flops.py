"""Counting the network's floating-point operations of a computation (PyTorch's FLOP counter:
matrix products, convolutions and attention), so accelerators report what they actually save and
``difflab sample --report`` shows what a run costs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` once and return (its result, the FLOPs it spent in PyTorch's counted ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def sampling_flops(pipe: Any, **call: Any) -> dict[str, float]:
    """The network FLOPs of sampling one image with ``pipe(1, **call)`` (the settings of a run: steps,
    sampler, guidance, accelerator, ...): per image, per denoiser call (a sampler step's evaluation,
    every guidance branch included) and, for a latent pipeline, the VAE decode among them."""
    import torch

    out, flops = count_flops(lambda: pipe(1, **call))
    calls = int(out.settings[0].get("denoiser_calls") or 0)
    decode = 0
    if getattr(pipe, "vae", None) is not None:
        latent = torch.zeros(1, *pipe.sample_shape, device=pipe.device)
        with torch.no_grad():
            _, decode = count_flops(lambda: pipe.vae.from_latent(latent))
    return {"gflops_per_image": flops / 1e9, "denoiser_calls": calls,
            "gflops_per_call": (flops - decode) / 1e9 / max(calls, 1), "decode_gflops": decode / 1e9}
