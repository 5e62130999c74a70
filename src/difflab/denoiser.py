"""The denoiser ``D(x_t, t) ~ E[x0 | x_t]``: the only object samplers and guidance see."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from difflab import predictions
from difflab.batch import batch_times, per_sample
from difflab.processes import Process

Tensor = torch.Tensor


class Denoiser(nn.Module):
    """Binds a network, a process, a prediction and default conditioning.

    ``den(x, t, **cond)`` returns the x0 estimate. ``t`` is the process time in [0, 1] (a scalar
    or one value per sample). The network is called as ``net(input_scale * x, model_time(t), **cond)``.
    ``den.eps``, ``den.velocity`` and ``den.predict`` give the other views of the same output.

    Pass ``time="t"`` to feed the callable the continuous time instead of ``process.model_time``.
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        process: Process,
        prediction: str | predictions.Prediction = "eps",
        *,
        time: str = "model",
        **cond: Any,
    ):
        super().__init__()
        if not isinstance(process, Process):
            raise TypeError(f"process must be a difflab Process, got {type(process).__name__}")
        if time not in ("model", "t"):
            raise ValueError(f"time must be 'model' or 't', got {time!r}")
        self.net = net
        self.process = process
        self.prediction = predictions.get(prediction)
        self.time = time
        self.cond = cond
        if self.prediction.needs_alpha and float(process.alpha(process.t_max)) == 0.0:
            raise ValueError(
                f"{self.prediction.name}-prediction cannot be used with {process!r}: alpha(t=1) = 0 "
                "there, so x0 = (x - sigma eps) / alpha is undefined. Use a 'v', 'x0', 'flow' or "
                "'edm' prediction (or a process with non-zero terminal SNR)."
            )

    @classmethod
    def from_fn(
        cls,
        fn: Callable[..., Tensor],
        process: Process,
        prediction: str | predictions.Prediction = "x0",
        *,
        time: str = "model",
        **cond: Any,
    ) -> Denoiser:
        """Wrap any callable ``fn(x, time, **cond)`` (an analytic model, another library's net)."""
        return cls(fn, process, prediction, time=time, **cond)

    def scales(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """(t per sample, alpha, sigma), alpha and sigma broadcast against x."""
        t = batch_times(t, x)
        alpha = per_sample(self.process.alpha(t).to(x.dtype), x)
        sigma = per_sample(self.process.sigma(t).to(x.dtype), x)
        return t, alpha, sigma

    def network_inputs(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(the network's input, its time) for state ``x`` at process time ``t``: what the network
        is called with (a ControlNet beside it takes the same)."""
        t, alpha, sigma = self.scales(x, t)
        return self._inputs(x, t, alpha, sigma)

    def _inputs(self, x: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        time = self.process.model_time(t) if self.time == "model" else t
        return self.prediction.input_scale(alpha, sigma) * x, time

    def raw(self, x: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """The network output for already-computed scales."""
        merged = {**self.cond, **cond}
        out = self.net(*self._inputs(x, t, alpha, sigma), **merged)
        if out.shape != x.shape:
            raise ValueError(
                f"the network returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; "
                "a denoiser network must return a tensor of its input's shape"
            )
        return out

    def predict(self, x: Tensor, t: Tensor | float, **cond: Any) -> tuple[Tensor, Tensor]:
        """(x0, eps) estimates from one network evaluation."""
        t, alpha, sigma = self.scales(x, t)
        out = self.raw(x, t, alpha, sigma, **cond)
        p = self.prediction
        return p.to_x0(out, x, alpha, sigma), p.to_eps(out, x, alpha, sigma)

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t, alpha, sigma = self.scales(x, t)
        return self.prediction.to_x0(self.raw(x, t, alpha, sigma, **cond), x, alpha, sigma)

    def eps(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """Noise estimate."""
        return self.predict(x, t, **cond)[1]

    def velocity(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """Rectified-flow velocity ``eps - x0`` (dx/dt for the ``Flow`` process)."""
        x0, eps = self.predict(x, t, **cond)
        return eps - x0

    def extra_repr(self) -> str:
        return f"process={self.process!r}, prediction={self.prediction.name!r}"
