"""The built-in demos.

``digits`` (the README's main job): train the class-conditional digits recipe, sample every class
with 20 steps, and score the samples with a digits classifier trained on the real training split.
``analytic``: sample the exact 2-D ring mixture and measure the error against ground truth (no
training; the core end to end: process -> denoiser -> sampler -> measured error).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from difflab import processes, recipes, samplers, schedules
from difflab.analytic import GaussianMixture
from difflab.metrics.distances import sliced_wasserstein
from difflab.metrics.ode_error import endpoint_error
from difflab.plotting import scatter


def run_analytic(out: str | os.PathLike = "outputs/demo", *, n: int = 2000, steps: int = 10, seed: int = 0,
        samplers_to_run: tuple[str, ...] = ("ddim", "dpmpp_2m", "unipc"), overwrite: bool = False) -> dict[str, Any]:
    """Sample the ring with each sampler on a flow and a Stable-Diffusion VP process; write
    ``samples.png`` (exact vs sampled) and ``metrics.json``; return the metrics. An earlier demo
    in ``out`` is replaced only with ``overwrite``."""
    from difflab.files import claim_output

    out = claim_output(out, ("samples.png", "metrics.json"), overwrite=overwrite, what="demo")
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
            rmse = endpoint_error(x, ref)["rmse"]
            metrics["results"][f"{label}/{name}"] = {
                "nfe": nfe, "rmse_to_exact_ode": rmse, "sliced_wasserstein_to_data": sliced_wasserstein(x, exact),
            }
            panels[f"{label} {name} ({nfe} NFE)"] = x
    metrics["sliced_wasserstein_data_vs_data"] = sliced_wasserstein(
        exact, mix.sample(n, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64))
    scatter(panels, out / "samples.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def run_digits(out: str | os.PathLike = "outputs/demo", *, config: str | os.PathLike | None = None,
               overrides: list[str] | None = None, n_per_class: int = 100, steps: int = 20,
               progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train the digits recipe into ``out``, then write ``samples.png`` and ``metrics.json``; an
    earlier demo in ``out`` is replaced only with ``overwrite``."""
    import time

    from difflab.files import claim_output
    from difflab.metrics.classifiers import accuracy, load_classifier
    from difflab.plotting import image_grid
    from difflab.training import config as train_config
    from difflab.training.trainer import Trainer

    out = claim_output(out, ("run", "samples.png", "metrics.json"), overwrite=overwrite, what="demo")
    config = config or recipes.path("digits")
    cfg = train_config.load(config, [*(overrides or []), f"out_dir={out / 'run'}", f"sample.steps={steps}"])
    start = time.time()
    trainer = Trainer(cfg)
    last = trainer.run(progress=progress)
    train_seconds = time.time() - start
    classifier, classifier_test_accuracy = load_classifier()
    labels = torch.arange(10).repeat_interleave(n_per_class)
    pipe = trainer.pipeline()
    samples = pipe(class_labels=labels, seed=0, batch_size=250, progress=progress).images
    acc = accuracy(classifier, samples.cpu(), labels)
    per_class = [accuracy(classifier, samples[labels == c].cpu(), labels[labels == c]) for c in range(10)]
    grid = torch.cat([samples[labels == c][:10] for c in range(10)])
    image_grid(grid, nrow=10, scale=8).save(out / "samples.png")
    metrics = {
        "recipe": str(config), "train_steps": last.get("step"), "final_loss": last.get("loss"),
        "train_seconds": round(train_seconds, 1), "sampler": cfg["sample"]["sampler"], "sampling_steps": steps,
        "samples": len(labels), "classifier_accuracy_on_samples": acc, "per_class_accuracy": per_class,
        "classifier_test_accuracy_on_real_digits": classifier_test_accuracy,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
