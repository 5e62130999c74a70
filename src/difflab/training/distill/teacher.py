"""The teacher a student learns from: a frozen denoiser (with classifier-free guidance folded in)
and the one ODE step every distillation method takes with it, batched with one time per sample."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from difflab.batch import per_sample
from difflab.processes import Process
from difflab.samplers.base import ddim_coefficients

Tensor = torch.Tensor
SOLVERS = ("euler", "heun")


def ddim_step(x: Tensor, denoised: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor,
              sigma_s: Tensor) -> Tensor:
    """The first-order probability-flow step from t to s (DDIM, Song et al. 2021) with one time per
    sample: the samplers' own coefficients (:func:`~difflab.samplers.base.ddim_coefficients`) on
    per-sample tensors. Needs sigma_t > 0."""
    cx, cd = ddim_coefficients(alpha_t, sigma_t, alpha_s, sigma_s)
    return cx * x + cd * denoised


class Teacher:
    """``teacher(x, t, **cond) -> x0``: a frozen denoiser on ``process``; ``scale`` > 1 applies
    classifier-free guidance (Ho & Salimans 2022) with ``null(cond)`` as the unconditional inputs, so
    a student distils the guided model (Meng et al. 2023). Also a denoiser for difflab's samplers.
    ``network``: the frozen network behind ``denoiser`` where there is one (a pipeline's), for
    methods that read the teacher's features (LADD)."""

    def __init__(self, denoiser: Callable[..., Tensor], process: Process, *, scale: float = 1.0,
                 null: Callable[[dict[str, Any]], dict[str, Any]] | None = None, network: Any = None):
        if scale != 1.0 and null is None:
            raise ValueError("a guided teacher (scale != 1) needs null(cond), its unconditional inputs")
        self.denoiser, self.process, self.scale, self.null = denoiser, process, float(scale), null
        self.network = network

    @classmethod
    def from_pipeline(cls, pipe: Any, scale: float = 1.0) -> Teacher:
        """The pipeline's network, frozen; the null condition is the null class or the empty prompt."""
        pipe.network.eval().requires_grad_(False)
        empty_prompt: dict[str, Tensor] = {}  # the null prompt's encoding, made once on first use

        def null(cond: dict[str, Any]) -> dict[str, Any]:
            if "class_labels" in cond:
                return {**cond, "class_labels": torch.full_like(cond["class_labels"], -1)}
            if "context" in cond:
                b = cond["context"].shape[0]
                if not empty_prompt:
                    empty_prompt.update(pipe.text_encoder().null(1))
                return {**cond, **{k: empty_prompt[k].to(cond[k].device).expand(b, *empty_prompt[k].shape[1:])
                                   for k in cond if k in empty_prompt}}
            raise ValueError("classifier-free guidance needs a class- or text-conditional teacher")

        return cls(pipe.denoiser(), pipe.process, scale=scale, null=null if pipe.num_classes or
                   pipe.text_encoder_config is not None else None, network=pipe.network)

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor | float, scale: Tensor | None = None, **cond: Any) -> Tensor:
        """The guided x0 estimate; ``scale``: one guidance scale per sample instead of the teacher's."""
        d = self.denoiser(x, t, **cond)
        if scale is None and self.scale == 1.0:
            return d
        if self.null is None:
            raise ValueError("a guided teacher needs null(cond), its unconditional inputs: a class- or text-"
                             "conditional teacher")
        w = per_sample(scale.to(d.dtype), d) if scale is not None else self.scale
        return d + (w - 1.0) * (d - self.denoiser(x, t, **self.null(cond)))

    def scales(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha(t), sigma(t) per sample, broadcast against ``like``."""
        return (per_sample(self.process.alpha(t).to(like.dtype), like),
                per_sample(self.process.sigma(t).to(like.dtype), like))

    @torch.no_grad()
    def step(self, x: Tensor, t: Tensor, s: Tensor, solver: str = "heun", scale: Tensor | None = None,
             **cond: Any) -> Tensor:
        """The teacher's probability-flow ODE from t to s < t (one time per sample): ``euler`` is
        DDIM (one evaluation); ``heun`` adds a second evaluation at s and uses the mean of the two
        estimates in the same exponential-integrator step (the trapezoidal rule in e^lambda,
        second order; Karras et al. 2022 use Heun for consistency distillation)."""
        if solver not in SOLVERS:
            raise ValueError(f"unknown teacher solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        at, st = self.scales(t, x)
        as_, ss = self.scales(s, x)
        d = self(x, t, scale, **cond)
        first = ddim_step(x, d, at, st, as_, ss)
        if solver == "euler":
            return first
        clean = ss == 0  # landing on data: the first step already returned D there, and the trapezoid keeps it
        d_end = torch.where(clean, d, self(first, s, scale, **cond))
        return ddim_step(x, 0.5 * (d + d_end), at, st, as_, ss)
