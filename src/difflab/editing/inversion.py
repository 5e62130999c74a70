"""Inversion: the noise from which a deterministic sampler makes a given image.

:func:`invert` runs the probability-flow ODE back up from the image: the sampler's final denoise
is undone first (the state at the grid's last noisy point whose estimate is the image, found by
fixed-point iteration), then the sampler's own method integrates the ascending grid (DDIM
inversion, Song et al. 2021 and Dhariwal & Nichol 2021; the same for every deterministic solver,
as diffusers' inverse schedulers do for DDIM and DPM-Solver). The reversed steps evaluate the model
at the lower end of each step, so a round trip is exact only in the limit of small steps;
``refine`` adds fixed-point iterations that solve each first-order step exactly (as ReNoise, Garibi
et al. 2024, and AIDI, Pan et al. 2023, do). :func:`null_text_inversion` (Mokady et al. 2023,
"Null-text Inversion for Editing Real Images using Guided Diffusion Models") makes the guided run
reconstruct the image by optimising the unconditional condition per step. For inversion that is
exact by construction see :mod:`difflab.editing.exact`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from difflab.editing.img2img import start_grid
from difflab.editing.inputs import EditError, check_image
from difflab.hooks import network_of
from difflab.samplers import PartialGrid, deterministic, run
from difflab.samplers.base import Grid, ddim_coefficients

Tensor = torch.Tensor
#: samplers whose step is the DDIM step (refined exactly by fixed-point iteration)
FIRST_ORDER = ("ddim", "euler")
#: samplers whose higher-order terms divide by the log-SNR step (infinite on a step onto alpha = 0)
LOG_SNR_MULTISTEP = ("dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "unipc")


def check_invertible(sampler: str, options: dict[str, Any]) -> None:
    """Refuse a sampler whose run cannot be retraced, with the reason."""
    if sampler == "adaptive":
        raise EditError("the adaptive sampler chooses its own steps as it goes, so its run cannot be retraced; "
                        "invert with a fixed-grid sampler (ddim, dpmpp_2m, heun, unipc, ...)")
    if not deterministic(sampler, options):
        raise EditError(f"sampler {sampler!r} with {options or 'its default options'} draws fresh noise at every "
                        "step, which no inversion can undo; use a deterministic sampler (ddim with eta=0, euler or "
                        "heun without churn, or an ODE solver such as dpmpp_2m)")


def undo_final_denoise(denoiser: Any, image: Tensor, t: float, cond: dict[str, Any], iterations: int) -> Tensor:
    """The state ``x`` at ``t`` (the grid's last noisy point) with ``D(x, t) = image``: fixed-point
    iteration ``x <- x + alpha (image - D(x))`` from ``x = alpha image``; its first iterate is
    ``alpha image + sigma eps_hat(alpha image)``, diffusers' first DDIM-inverse step."""
    alpha = float(denoiser.process.alpha(torch.tensor(t, dtype=torch.float64)))
    x = alpha * image
    tt = torch.full((image.shape[0],), t, dtype=image.dtype, device=image.device)
    for _ in range(1 + iterations):
        x = x + alpha * (image - denoiser(x, tt, **cond))
    return x


@dataclass
class Inversion:
    """The state at the start of the sampling grid ``ts`` from which ``sampler`` remakes the image;
    for the first-order samplers also the state at every point of the grid (sampling order, the
    image last), which null-text inversion follows."""

    state: Tensor
    ts: Tensor
    sampler: str
    process: Any
    options: dict[str, Any] = field(default_factory=dict)
    trajectory: list[Tensor] = field(default_factory=list)
    nfe: int = 0

    @property
    def noise(self) -> Tensor:
        """The state as unit noise (``state / sigma(t_start)``): what :func:`difflab.sample` takes."""
        return self.state / float(self.process.sigma(torch.tensor(float(self.ts[0]), dtype=torch.float64)))

    def sample(self, denoiser: Any, *, cond: dict[str, Any] | None = None, **kw: Any) -> Tensor:
        """Run the sampler from the inverted state: with the inverting denoiser and condition it
        reconstructs the image; with another prompt or guidance it edits it."""
        return run(denoiser, self.state, self.ts, self.sampler, cond=cond, **{**self.options, **kw})


def invert(denoiser: Any, image: Tensor, sampler: str = "ddim", steps: int = 50,
           schedule: str | Tensor | Sequence[float] = "uniform", *, cond: dict[str, Any] | None = None,
           strength: float = 1.0, refine: int = 0, schedule_options: dict[str, Any] | None = None,
           **options: Any) -> Inversion:
    """Invert ``image`` (the sampler's state space) for ``sampler`` on the grid of ``steps`` (started
    at ``strength`` as img2img does). ``refine`` > 0 adds that many fixed-point iterations to the
    undoing of the final denoise and, for the first-order samplers (``ddim``, ``euler``), to every
    step, which then inverts the sampler's steps exactly in the limit of many iterations."""
    check_invertible(sampler, options)
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise EditError(f"refine must be a whole number >= 0 (fixed-point iterations per step), got {refine!r}")
    image = check_image(image)
    cond = cond or {}
    ts = start_grid(denoiser.process, schedule, steps, strength, schedule_options)
    grid = Grid.build(denoiser.process, ts, image)
    n = grid.steps
    with torch.no_grad():
        x = undo_final_denoise(denoiser, image, grid.t[n - 1], cond, refine)
        states, nfe = [image, x], 1 + refine
        if sampler in FIRST_ORDER:
            times = grid.times()
            for k in range(n - 2, -1, -1):
                r, c = ddim_coefficients(*grid.step(k))
                target, d = x, denoiser(x, times[k + 1], **cond)  # explicit: the model at the step's lower end
                x = (target - c * d) / r
                ak, sk, aj, sj = grid.step(k)
                for _ in range(refine):  # fixed point of the forward step, on the noise estimate
                    d = denoiser(x, times[k], **cond)
                    if ak > 0:  # x_{k+1} = (aj / ak) x_k + (sj - aj sk / ak) eps(x_k): contracts for small steps
                        x = (target - (sj - aj * sk / ak) * (x - ak * d) / sk) * (ak / aj)
                    else:  # at alpha = 0 the x0 form: x_{k+1} = r x_k + c D(x_k)
                        x = (target - c * d) / r
                nfe += 1 + refine
                states.append(x)
        elif n > 1:
            # the log-SNR multistep methods' higher-order terms are infinite on a step onto alpha = 0
            # (rectified flow's t = 1, lambda = -inf); their last step up is DDIM's finite formula
            top = 1 if grid.alpha[0] == 0 and sampler in LOG_SNR_MULTISTEP else 0
            if n - 1 > top:
                up = PartialGrid.of(list(reversed(grid.t[top:-1])))
                x, evals = run(denoiser, x, up, sampler, cond=cond, return_nfe=True, **options)
                nfe += evals
            if top:
                r, c = ddim_coefficients(grid.alpha[1], grid.sigma[1], grid.alpha[0], grid.sigma[0])
                x = r * x + c * denoiser(x, grid.times()[1], **cond)
                nfe += 1
            states = [image, x]
    return Inversion(x, ts, sampler, denoiser.process, dict(options), list(reversed(states)), nfe)


@dataclass
class NullTextInversion:
    """A DDIM-inverted state and, per step, the optimised unconditional condition with which
    classifier-free guidance at ``scale`` reconstructs the image."""

    state: Tensor
    ts: Tensor
    scale: float
    cond: dict[str, Any]
    unconds: list[dict[str, Tensor]]
    losses: list[float]

    def denoiser(self, denoiser: Any) -> PerStepGuidance:
        return PerStepGuidance(denoiser, self.scale, self.ts, self.unconds)

    def sample(self, denoiser: Any, cond: dict[str, Any] | None = None) -> Tensor:
        """The guided DDIM run with the optimised null conditions (``cond`` edits the prompt; class
        labels become embeddings, as the optimised null condition is one)."""
        if cond is None:
            cond = self.cond
        elif isinstance(cond.get("class_labels"), Tensor) and not cond["class_labels"].is_floating_point():
            cond = label_embeddings(denoiser, cond)[0]
        return run(self.denoiser(denoiser), self.state, self.ts, "ddim", cond=cond)


class PerStepGuidance(torch.nn.Module):
    """Classifier-free guidance whose unconditional condition is the one optimised for the step
    whose time ``t`` is (null-text inversion's sampling)."""

    def __init__(self, denoiser: Any, scale: float, ts: Tensor, unconds: list[dict[str, Tensor]]):
        super().__init__()
        self.denoiser, self.process, self.scale = denoiser, denoiser.process, scale
        self.ts, self.unconds = ts.tolist(), unconds

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        from difflab.guidance import CFG

        tt = float(t.reshape(-1)[0])
        k = min(range(len(self.unconds)), key=lambda i: abs(self.ts[i] - tt))
        if abs(self.ts[k] - tt) > 1e-6:
            raise EditError(f"null-text inversion was made for the grid {self.ts}; t = {tt} is not on it")
        return CFG(self.denoiser, self.scale, uncond=self.unconds[k])(x, t, **cond)


def label_embeddings(denoiser: Any, cond: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cond, uncond) with class labels as the network's embeddings, which can be optimised."""
    net = network_of(denoiser)
    labels = cond.get("class_labels")
    if net is None or labels is None or labels.is_floating_point():
        raise EditError("null-text inversion needs the unconditional condition as embeddings: pass uncond= "
                        "(a text pipeline's null prompt encoding), or class labels of a difflab network")
    with torch.no_grad():
        return ({**cond, "class_labels": net.embed_class_labels(labels)},
                {"class_labels": net.embed_class_labels(torch.full_like(labels, -1))})


def _guided_step(denoiser: Any, z: Tensor, t: Tensor, uncond: dict[str, Any], d_c: Tensor, r: float, c: float,
                 scale: float) -> Tensor:
    """A DDIM step with classifier-free guidance whose conditional estimate ``d_c`` is given."""
    d_u = denoiser(z, t, **uncond)
    return r * z + c * (d_u + scale * (d_c - d_u))


def null_text_inversion(denoiser: Any, image: Tensor, cond: dict[str, Any], *, scale: float = 5.0,
                        uncond: dict[str, Tensor] | None = None, steps: int = 50,
                        schedule: str | Tensor | Sequence[float] = "uniform", inner_steps: int = 10,
                        lr: float = 5e-2, tolerance: float = 1e-5, tolerance_growth: float = 0.0,
                        schedule_options: dict[str, Any] | None = None,
                        progress: bool = False) -> NullTextInversion:
    """Null-text inversion: DDIM-invert ``image`` at guidance 1 (the pivot trajectory), then, step
    by step from the noise, optimise the unconditional condition (Adam, ``inner_steps`` at most, the
    learning rate falling over the run as in the paper) so that the step guided at ``scale`` lands on
    the pivot, stopping early below ``tolerance + tolerance_growth * k`` at step k of 50. The paper
    lets the threshold grow (2e-5 per step, for SD's latents); on the digits model that growth stopped
    the optimisation as the error rose and left the reconstruction 4.5 dB short of the pivot (36.2
    dB), without it the guided run reconstructs better than the pivot does (measured 44.4 dB against
    41.8 dB on 32 test digits), so it is 0 by default. ``uncond``: the null condition to start from
    (for a text model the empty prompt's encoding; class labels become embeddings by themselves)."""
    image = check_image(image)
    if uncond is None:
        cond, uncond = label_embeddings(denoiser, cond)
    pivot = invert(denoiser, image, "ddim", steps, schedule, cond=cond, schedule_options=schedule_options)
    grid = Grid.build(denoiser.process, pivot.ts, image)
    times = grid.times()
    current = {k: v.detach().expand(image.shape[0], *v.shape[1:]).clone() if v.shape[0] == 1 else v.detach().clone()
               for k, v in uncond.items()}
    z, unconds, losses = pivot.trajectory[0], [], []
    for k in tqdm(range(grid.steps), desc="null-text inversion", disable=not progress):
        r, c = ddim_coefficients(*grid.step(k))
        target = pivot.trajectory[k + 1]
        with torch.no_grad():
            d_c = denoiser(z, times[k], **cond)
        params = {key: v.detach().clone().requires_grad_(True) for key, v in current.items() if v.is_floating_point()}
        optim = torch.optim.Adam(list(params.values()), lr=lr * (1 - k / (2 * grid.steps)))

        loss = torch.tensor(0.0)
        for _ in range(inner_steps):
            with torch.enable_grad():
                stepped = _guided_step(denoiser, z, times[k], {**cond, **current, **params}, d_c, r, c, scale)
                loss = torch.nn.functional.mse_loss(stepped, target)
                if float(loss.detach()) < tolerance + tolerance_growth * k * 50 / grid.steps:
                    break
                optim.zero_grad()
                loss.backward()
                optim.step()
        current = {**current, **{key: v.detach() for key, v in params.items()}}
        with torch.no_grad():
            z = _guided_step(denoiser, z, times[k], {**cond, **current}, d_c, r, c, scale)
        unconds.append(dict(current))
        losses.append(float(loss.detach()))
    return NullTextInversion(pivot.state, pivot.ts, float(scale), cond, unconds, losses)
