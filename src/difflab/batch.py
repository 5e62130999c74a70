"""Values given per sample of a batch: the one place that shapes and checks them.

``batch_times(t, x)`` turns a scalar or one-per-sample time into a ``(batch,)`` vector;
``per_sample(v, x)`` shapes a scalar or one-per-sample value to broadcast against ``x``;
``tiled(v, batch, what)`` repeats per-image inputs over a guidance batch (a multiple of the images).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def batch_times(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as one value per sample of ``x``, on ``x``'s device (integers become ``x``'s float dtype)."""
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError(f"x must be a batch tensor of shape (batch, ...), got {type(x).__name__} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    t = torch.as_tensor(t, device=x.device)
    if not t.is_floating_point():
        t = t.to(x.dtype)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a scalar or hold one value per sample: got shape {tuple(t.shape)} for a "
                         f"batch of {x.shape[0]}")
    return t


def per_sample(v: Tensor | float, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A scalar or ``(batch,)`` value shaped ``(batch, 1, ..., 1)`` to broadcast against ``x``
    (a scalar stays a scalar); converted to ``dtype`` when given (a Python number takes ``x``'s dtype)."""
    if isinstance(v, Tensor):
        v = v.to(device=x.device, dtype=dtype) if dtype is not None else v.to(x.device)
    else:  # a Python number: made in the target dtype directly, not through float32
        v = torch.tensor(v, device=x.device, dtype=dtype or x.dtype)
    if v.ndim == 0:
        return v
    if v.ndim != 1 or v.shape[0] != x.shape[0]:
        raise ValueError(f"expected a scalar or one value per sample: got shape {tuple(v.shape)} "
                         f"for a batch of shape {tuple(x.shape)}")
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def tiled(values: Tensor, batch: int, what: str, error: type[Exception] = ValueError) -> Tensor:
    """Per-image ``values`` (N, ...) repeated to a batch of ``batch`` = k * N rows (guidance calls
    a denoiser on [cond, uncond, ...]); anything else is refused, naming ``what`` they are."""
    reps, rest = divmod(batch, values.shape[0])
    if rest or not reps:
        raise error(f"{what} for {values.shape[0]} images, called on a batch of {batch}")
    return values if reps == 1 else values.repeat(reps, *([1] * (values.ndim - 1)))
