"""Int8 inference for a network's linear and convolution layers.

* **Dynamic int8 for linear layers**: each weight row is quantized once (symmetric, one scale per
  output channel), each activation row at run time (one scale per token), and the product runs on
  integers (``torch._int_mm``, int32 accumulation; exact integer arithmetic, so only the two
  roundings to int8 differ from float). Where a backend lacks the integer kernel the same integers
  are multiplied in float.
* **Static int8 for convolutions with timestep-aware calibration** (Q-Diffusion; Li et al. 2023,
  "Q-Diffusion: Quantizing Diffusion Models"): a diffusion network's activation ranges move with the
  noise level, so one range per layer fits no step well. :func:`calibrate_int8` runs the model's own
  sampling on a calibration batch and records, per layer and per time interval, the range of its
  input (its min and max, or a percentile); sampling then quantizes each convolution's
  input with the range of the sample's interval (asymmetric uint8) and its weight per output
  channel. This path is simulated ("fake quant"): it gives the quality int8 hardware would and the
  int8 weight size, not eager-mode speed.

:func:`int8` opens both around a denoiser for the ``with`` (through the network's
``replace_layers``) and restores every layer on exit. The calibration is plain data (JSON) that a
pipeline folder keeps (``int8.json``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from difflab.batch import batch_times
from difflab.hooks import network_of

Tensor = torch.Tensor
CALIBRATION_FORMAT = "difflab-int8-calibration"


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel (dim 0): ``(q, scale)`` with ``weight ~ q * scale``."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(1).clamp_min(1e-12) / 127
    q = torch.round(flat / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(weight.shape), scale


def int8_matmul(xq: Tensor, wq_t: Tensor) -> Tensor:
    """``xq @ wq_t`` of int8 matrices with int32 accumulation, as float."""
    if xq.device.type == "cpu":
        return torch._int_mm(xq, wq_t).float()
    if xq.device.type == "cuda" and xq.shape[0] > 16 and xq.shape[1] % 8 == 0 and wq_t.shape[1] % 8 == 0:
        return torch._int_mm(xq, wq_t).float()
    return xq.float() @ wq_t.float()


class DynamicInt8Linear:
    """A linear layer's computation in int8: weights per channel, activations per row at run time."""

    def __init__(self, layer: torch.nn.Linear):
        q, self.weight_scale = quantize_weight(layer.weight)
        self.weight_t = q.t().contiguous()  # (in, out), the layout the integer kernel takes
        self.bias = None if layer.bias is None else layer.bias.detach().float()
        self.out_features = layer.out_features

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        scale = rows.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        xq = torch.round(rows / scale).clamp_(-127, 127).to(torch.int8)
        out = int8_matmul(xq, self.weight_t) * scale * self.weight_scale
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def nbytes(self) -> int:
        return self.weight_t.numel() + 4 * (self.weight_scale.numel() + (0 if self.bias is None else self.bias.numel()))


class TimeIntervals:
    """The calibration's time intervals and, during one network call, each sample's interval."""

    def __init__(self, count: int):
        self.count, self.current = int(count), None

    def of(self, t: Tensor) -> Tensor:
        return (t.float() * self.count).long().clamp_(0, self.count - 1)


class _Timed:
    """A denoiser that tells ``intervals`` each sample's time interval while it runs (optionally with
    some of its network's layers replaced)."""

    def __init__(self, denoiser: Any, intervals: TimeIntervals, network: Any = None,
                 computations: dict[str, Callable[[Tensor], Tensor]] | None = None):
        self.denoiser, self.process, self.intervals = denoiser, denoiser.process, intervals
        self.network, self.computations = network, computations

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = batch_times(t, x)
        self.intervals.current = self.intervals.of(t)
        try:
            if not self.computations:
                return self.denoiser(x, t, **cond)
            with self.network.replace_layers(self.computations):
                return self.denoiser(x, t, **cond)
        finally:
            self.intervals.current = None


class StaticInt8Conv2d:
    """A convolution's computation with int8 weights and its input quantized to the calibrated range
    of each sample's time interval (simulated in float)."""

    def __init__(self, layer: torch.nn.Conv2d, ranges: Tensor, intervals: TimeIntervals):
        q, scale = quantize_weight(layer.weight)
        self.weight = (q.float() * scale.reshape(-1, 1, 1, 1)).to(layer.weight.dtype)
        self._bytes = q.numel() + 4 * scale.numel() + (0 if layer.bias is None else 4 * layer.bias.numel())
        self.bias, self.layer, self.intervals = layer.bias, layer, intervals
        low, high = ranges[:, 0].clamp(max=0.0), ranges[:, 1].clamp(min=0.0)  # the range holds 0 exactly
        self.step = ((high - low) / 255).clamp_min(1e-8).to(layer.weight.device)
        self.zero = torch.round(-low.to(self.step.device) / self.step)

    def __call__(self, x: Tensor) -> Tensor:
        which = self.intervals.current
        if which is None or which.shape[0] != x.shape[0]:  # a call outside the denoiser: the widest range
            step, zero = self.step.max().reshape(1), self.zero[self.step.argmax()].reshape(1)
        else:
            step, zero = self.step[which], self.zero[which]
        step, zero = step.reshape(-1, 1, 1, 1).to(x.dtype), zero.reshape(-1, 1, 1, 1).to(x.dtype)
        xq = (torch.round(x / step) + zero).clamp_(0, 255).sub_(zero).mul_(step)
        c = self.layer
        if c.padding_mode != "zeros":
            xq = F.pad(xq, c._reversed_padding_repeated_twice, mode=c.padding_mode)
            return F.conv2d(xq, self.weight, self.bias, c.stride, 0, c.dilation, c.groups)
        return F.conv2d(xq, self.weight, self.bias, c.stride, c.padding, c.dilation, c.groups)

    def nbytes(self) -> int:
        return self._bytes


class Int8(_Timed):
    """A denoiser whose network runs its linear layers (and, calibrated, its convolutions) in int8."""

    def __init__(self, denoiser: Any, calibration: dict[str, Any] | None, linear: bool):
        network = network_of(denoiser)
        if network is None:
            raise ValueError("int8 inference quantizes a difflab network's layers; this denoiser has none (an "
                             "analytic model or a plain function?)")
        layers = network.weight_layers()
        if calibration is not None:
            _check_calibration(calibration, layers)
        intervals = TimeIntervals(calibration["intervals"] if calibration is not None else 1)
        computations: dict[str, Callable[[Tensor], Tensor]] = {}
        if linear:
            computations.update({name: DynamicInt8Linear(m) for name, m in layers.items()
                                 if isinstance(m, torch.nn.Linear)})
        if calibration is not None:
            for name, ranges in calibration["ranges"].items():
                computations[name] = StaticInt8Conv2d(layers[name], torch.tensor(ranges, dtype=torch.float32),
                                                      intervals)
        super().__init__(denoiser, intervals, network, computations)
        float_bytes = sum(p.numel() * p.element_size() for name, m in layers.items() if name in computations
                          for p in m.parameters(recurse=False))
        int8_bytes = sum(c.nbytes() for c in computations.values())
        self.report = {"layers": len(computations), "float_bytes": float_bytes, "int8_bytes": int8_bytes}


def _check_calibration(calibration: Any, layers: dict[str, Any]) -> None:
    if not isinstance(calibration, dict) or calibration.get("format") != CALIBRATION_FORMAT:
        raise ValueError("the int8 calibration must be what calibrate_int8 returns (or a pipeline's int8.json); "
                         "got something else")
    missing = sorted(set(calibration["ranges"]) - set(layers))
    if missing:
        raise ValueError(f"the int8 calibration was made for another network: it names layer(s) this one lacks "
                         f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); calibrate this network")
    count = calibration["intervals"]
    for name, ranges in calibration["ranges"].items():
        if not isinstance(layers[name], torch.nn.Conv2d) or len(ranges) != count:
            raise ValueError(f"the int8 calibration's entry for {name} does not fit the network (a convolution with "
                             f"{count} ranges expected)")


@contextmanager
def int8(denoiser: Any, calibration: dict[str, Any] | None = None, linear: bool = True) -> Iterator[Int8]:
    """Int8 inference for the ``with``: every linear layer dynamically (``linear=True``), and every
    convolution statically when ``calibration`` (from :func:`calibrate_int8`) is given."""
    if calibration is None and not linear:
        raise ValueError("nothing to quantize: give a calibration for the convolutions or leave linear=True")
    yield Int8(denoiser, calibration, linear)


def calibrate_int8(denoiser: Any, run: Callable[[Any], Any], intervals: int = 8,
                   percentile: float = 100.0) -> dict[str, Any]:
    """Timestep-aware activation ranges of every convolution: ``run(den)`` samples a calibration
    batch with the denoiser it is given; each convolution's input range (the ``percentile`` and its
    mirror; 100 = min and max) is kept per time interval (``intervals`` equal parts of [0, 1]), the
    widest over calls. Deterministic for a deterministic ``run``; JSON-ready. (On the digits U-Net,
    8 intervals at min/max give 0.59x the image error of one range per layer; clipping percentiles
    such as 99.9 do worse: bench/results/accel.md.)"""
    network = network_of(denoiser)
    if network is None:
        raise ValueError("int8 calibration needs a denoiser over a difflab network")
    if isinstance(intervals, bool) or not isinstance(intervals, int) or intervals < 1:
        raise ValueError(f"intervals must be a whole number >= 1, got {intervals!r}")
    if not 50.0 < float(percentile) <= 100.0:
        raise ValueError(f"percentile must lie in (50, 100], got {percentile!r}")
    convs = {name: m for name, m in network.weight_layers().items() if isinstance(m, torch.nn.Conv2d)}
    if not convs:
        raise ValueError("this network has no convolutions to calibrate (dynamic int8 covers linear layers)")
    clock = TimeIntervals(intervals)
    low = {name: [float("inf")] * intervals for name in convs}
    high = {name: [float("-inf")] * intervals for name in convs}
    q = float(percentile) / 100

    def recorder(name: str) -> Callable[[Tensor, Tensor], Tensor]:
        def record(x: Tensor, out: Tensor) -> Tensor:
            rows = x.detach().float().flatten(1)
            which = clock.current
            if which is None or len(which) != len(rows):  # a call outside the denoiser's batch: the noisiest interval
                which = torch.full((len(rows),), intervals - 1)
            for k in which.unique().tolist():
                values = rows[which.to(rows.device) == k].flatten()
                if values.numel() > 1 << 20:  # quantile's input limit; a strided subsample is deterministic
                    values = values[:: values.numel() // (1 << 20) + 1]
                lo, hi = torch.quantile(values, torch.tensor([1 - q, q])).tolist()
                low[name][k], high[name][k] = min(low[name][k], lo), max(high[name][k], hi)
            return out

        return record

    with torch.no_grad(), network.hook_layers({name: recorder(name) for name in convs}):
        run(_Timed(denoiser, clock))
    ranges = {}
    for name in convs:
        seen = [(lo, hi) for lo, hi in zip(low[name], high[name], strict=True) if lo <= hi]
        if not seen:
            raise ValueError(f"the calibration run never reached layer {name}: run must sample with the denoiser "
                             "it is given")
        widest = (min(lo for lo, _ in seen), max(hi for _, hi in seen))  # for intervals the run never visited
        ranges[name] = [[lo, hi] if lo <= hi else list(widest) for lo, hi in zip(low[name], high[name], strict=True)]
    return {"format": CALIBRATION_FORMAT, "intervals": intervals, "percentile": float(percentile), "ranges": ranges}
