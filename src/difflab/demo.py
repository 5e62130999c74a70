"""The built-in demo: sample the exact 2-D ring mixture and measure the error against ground truth.

Until the training issues land this is the README's main job: it needs no data and no training,
and it shows the core working end to end (process -> denoiser -> sampler -> measured error).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from difflab import processes, samplers, schedules
from difflab.analytic import GaussianMixture, sliced_wasserstein
from difflab.plotting import scatter


def run(out: str | os.PathLike = "outputs/demo", *, n: int = 2000, steps: int = 10, seed: int = 0,
        samplers_to_run: tuple[str, ...] = ("ddim", "dpmpp_2m", "unipc")) -> dict[str, Any]:
    """Sample the ring with each sampler on a flow and a Stable-Diffusion VP process; write
    ``samples.png`` (exact vs sampled) and ``metrics.json``; return the metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    mix = GaussianMixture.ring(num_components=8, radius=1.0, std=0.08)
    setups = {
        "flow/flow": (processes.Flow(), "flow"),
        "scaled_linear/eps": (processes.DiscreteVP.scaled_linear(), "eps"),
    }
    exact = mix.sample(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    metrics: dict[str, Any] = {"n": n, "steps": steps, "seed": seed, "results": {}}
    panels = {"exact samples": exact}
    for label, (proc, pred) in setups.items():
        den = mix.denoiser(proc, pred)
        ts = schedules.get("karras", proc, steps)
        x_t = float(proc.sigma(torch.tensor(float(ts[0]), dtype=torch.float64))) * noise
        ref = mix.ode_solve(x_t, proc, float(ts[0]))
        for name in samplers_to_run:
            x, nfe = samplers.sample(den, noise, name, steps=steps, schedule=ts, return_nfe=True)
            rmse = float(((x - ref) ** 2).mean().sqrt())
            metrics["results"][f"{label}/{name}"] = {
                "nfe": nfe, "rmse_to_exact_ode": rmse, "sliced_wasserstein_to_data": sliced_wasserstein(x, exact),
            }
            panels[f"{label} {name} ({nfe} NFE)"] = x
    metrics["sliced_wasserstein_data_vs_data"] = sliced_wasserstein(
        exact, mix.sample(n, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64))
    scatter(panels, out / "samples.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
