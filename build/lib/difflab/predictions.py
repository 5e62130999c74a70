"""What a network predicts, and how its output converts exactly to x0 and eps.

Each prediction is written in (alpha, sigma) so it holds for every process:

* ``eps``  — the noise (Ho et al. 2020). x0 = (x - sigma eps) / alpha: **undefined where
  alpha = 0** (rectified flow at t = 1, zero-terminal-SNR VP), so it is refused there.
* ``x0``   — the clean sample. eps = (x - alpha x0) / sigma: undefined at sigma = 0 only.
* ``v``    — Salimans & Ho 2022, generalised to any process through the normalised scales
  a = alpha / r, b = sigma / r with r = sqrt(alpha^2 + sigma^2): v = a eps - b x0. Finite everywhere.
* ``flow`` — the rectified-flow velocity u = eps - x0 (Liu et al. 2023; dx/dt for ``Flow``).
  x0 = (x - sigma u) / (alpha + sigma), finite everywhere.
* ``edm``  — the preconditioning of Karras et al. 2022, Table 1, in VE form ``x = x_t / alpha``,
  ``s = sigma / alpha``: D = c_skip x + c_out F(c_in x, c_noise). Written in ratio form so it is
  finite at alpha = 0 (c_in x = x_t / sqrt(sigma^2 + sigma_data^2 alpha^2)). c_noise is the
  process's ``model_time``.

``input_scale`` is what the network input is multiplied by (1 except for ``edm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Prediction:
    """Base class; alpha and sigma arrive already broadcast against x."""

    name: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    #: whether the conversion to x0 divides by alpha (so the prediction is unusable at alpha = 0)
    needs_alpha: ClassVar[bool] = False

    def input_scale(self, alpha: Tensor, sigma: Tensor) -> Tensor | float:
        return 1.0

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Training target for ``x_t = alpha x0 + sigma eps``."""
        raise NotImplementedError

    def to_x0(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def to_eps(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (x - alpha * self.to_x0(out, x, alpha, sigma)) / sigma

    def from_x0(self, x0: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The network output that corresponds to ``x0`` at ``x`` (inverse of :meth:`to_x0`)."""
        eps = (x - alpha * x0) / sigma
        return self.target(x0, eps, alpha, sigma)


@dataclass(frozen=True)
class Eps(Prediction):
    name: ClassVar[str] = "eps"
    reference: ClassVar[str] = "Ho et al. 2020, Denoising Diffusion Probabilistic Models"
    needs_alpha: ClassVar[bool] = True

    def target(self, x0, eps, alpha, sigma):
        return eps

    def to_x0(self, out, x, alpha, sigma):
        return (x - sigma * out) / alpha

    def to_eps(self, out, x, alpha, sigma):
        return out


@dataclass(frozen=True)
class X0(Prediction):
    name: ClassVar[str] = "x0"
    reference: ClassVar[str] = "Ramesh et al. 2022 / Karras et al. 2022 (data prediction)"

    def target(self, x0, eps, alpha, sigma):
        return x0

    def to_x0(self, out, x, alpha, sigma):
        return out

    def from_x0(self, x0, x, alpha, sigma):
        return x0


def _unit(alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r = torch.sqrt(alpha * alpha + sigma * sigma)
    return alpha / r, sigma / r, r


@dataclass(frozen=True)
class V(Prediction):
    name: ClassVar[str] = "v"
    reference: ClassVar[str] = "Salimans & Ho 2022, Progressive Distillation"

    def target(self, x0, eps, alpha, sigma):
        a, b, _ = _unit(alpha, sigma)
        return a * eps - b * x0

    def to_x0(self, out, x, alpha, sigma):
        a, b, r = _unit(alpha, sigma)
        return a * (x / r) - b * out

    def to_eps(self, out, x, alpha, sigma):
        a, b, r = _unit(alpha, sigma)
        return b * (x / r) + a * out


@dataclass(frozen=True)
class FlowVelocity(Prediction):
    name: ClassVar[str] = "flow"
    reference: ClassVar[str] = "Liu et al. 2023, Flow Straight and Fast (rectified flow)"

    def target(self, x0, eps, alpha, sigma):
        return eps - x0

    def to_x0(self, out, x, alpha, sigma):
        return (x - sigma * out) / (alpha + sigma)

    def to_eps(self, out, x, alpha, sigma):
        return (x + alpha * out) / (alpha + sigma)


@dataclass(frozen=True)
class EDMPrecond(Prediction):
    name: ClassVar[str] = "edm"
    reference: ClassVar[str] = "Karras et al. 2022, Elucidating the Design Space (Table 1)"
    sigma_data: float = 0.5

    def _coefficients(self, alpha, sigma):
        sd = self.sigma_data
        denom = sigma * sigma + (sd * alpha) ** 2  # = alpha^2 (s^2 + sd^2)
        skip = sd * sd * alpha / denom  # c_skip / alpha: multiplies x_t
        out = sigma * sd / denom.sqrt()  # c_out
        return skip, out, denom.rsqrt()  # c_in / alpha: multiplies x_t

    def input_scale(self, alpha, sigma):
        return self._coefficients(alpha, sigma)[2]

    def target(self, x0, eps, alpha, sigma):
        skip, out, _ = self._coefficients(alpha, sigma)
        x = alpha * x0 + sigma * eps
        return (x0 - skip * x) / out

    def to_x0(self, out, x, alpha, sigma):
        skip, c_out, _ = self._coefficients(alpha, sigma)
        return skip * x + c_out * out


PREDICTIONS: dict[str, type[Prediction]] = {c.name: c for c in (Eps, X0, V, FlowVelocity, EDMPrecond)}


def available() -> list[str]:
    return list(PREDICTIONS)


def get(prediction: str | Prediction | dict, **kwargs) -> Prediction:
    """A prediction by name (``eps``, ``x0``, ``v``, ``flow``, ``edm``), dict or instance."""
    if isinstance(prediction, Prediction):
        return prediction
    if isinstance(prediction, dict):
        kwargs = {**{k: v for k, v in prediction.items() if k != "name"}, **kwargs}
        prediction = prediction["name"]
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    return PREDICTIONS[prediction](**kwargs)
