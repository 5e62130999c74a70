"""Trajectory stitching: a small network for the early, high-noise part of sampling and the large
one for the rest (T-Stitch; Pan et al. 2024, "T-Stitch: Accelerating Sampling in Pre-Trained
Diffusion Models with Trajectory Stitching").

At high noise the denoiser's answer is coarse (the posterior mean of many images), which a small
network trained on the same data and process gets nearly right; the large network's capacity pays
where the details are decided. Both are denoisers of the same process (their predictions may
differ: each returns its x0 estimate), so the stitched denoiser works with every sampler, and it
keeps no state: which network runs depends only on each sample's time.

Guidance goes inside: stitch two guided denoisers (``t_stitch(guide(large, "pag"), guide(small,
"pag"))``), so that methods reaching into the network (PAG's attention, ICG's label table) act on
the network that runs. A pipeline does this itself (``pipe(..., accelerator={"name": "t_stitch",
"small": "path/to/small/pipeline", "switch": 0.6})``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from difflab.batch import batch_times

Tensor = torch.Tensor


class Stitched:
    """A denoiser that evaluates ``small`` where ``t > switch`` and ``large`` elsewhere, per sample."""

    def __init__(self, large: Any, small: Any, switch: float):
        if not callable(small) or not hasattr(small, "process"):
            raise ValueError(f"small must be a difflab denoiser (a network bound to its process), got "
                             f"{type(small).__name__}; a pipeline gives one as pipe.denoiser()")
        if small.process != large.process:
            raise ValueError(f"the two networks must share the noise process to stitch their trajectories: the "
                             f"large one has {large.process!r}, the small one {small.process!r}")
        if isinstance(switch, bool) or not 0.0 <= float(switch) <= 1.0:
            raise ValueError(f"switch is the time in [0, 1] above which the small network runs (0.6 gives it the "
                             f"first 40 % of a uniform grid), got {switch!r}")
        self.large, self.small, self.switch, self.process = large, small, float(switch), large.process
        self.report = {"evaluations": 0, "small_samples": 0, "large_samples": 0}

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = batch_times(t, x)
        on_small = t > self.switch
        n_small = int(on_small.sum())  # one host sync per evaluation, to run each network on its share only
        self.report["evaluations"] += 1
        self.report["small_samples"] += n_small
        self.report["large_samples"] += x.shape[0] - n_small
        if n_small == 0:
            return self.large(x, t, **cond)
        if n_small == x.shape[0]:
            return self.small(x, t, **cond)
        out = torch.empty_like(x)
        for use, den in ((on_small, self.small), (~on_small, self.large)):
            part = {k: v[use] if isinstance(v, Tensor) and v.shape[:1] == x.shape[:1] else v for k, v in cond.items()}
            out[use] = den(x[use], t[use], **part)
        return out


@contextmanager
def t_stitch(denoiser: Any, small: Any, switch: float = 0.6) -> Iterator[Stitched]:
    """T-Stitch: ``small`` denoises while ``t > switch``, ``denoiser`` (the large one) from there on.
    ``switch=1`` is the large network alone, ``switch=0`` the small one alone."""
    yield Stitched(denoiser, small, switch)
