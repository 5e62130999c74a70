"""Samplers benchmark: difflab's samplers x schedules against diffusers' schedulers, on exact answers.

For each analytic mixture (2-D ring, d = 64 low-rank) and process (Stable Diffusion's discrete VP
with eps-prediction; rectified flow with velocity prediction), every method starts from the same
noise ``x_T = sigma(1) * z`` and is scored by
  * RMSE per dimension to the exact probability-flow ODE endpoint from that x_T at t = 1 (DOP853,
    rtol 1e-10, integrated to the process's smallest training noise level and denoised exactly
    there): the noise-to-data map of the process. A schedule that starts below t = 1 (diffusers'
    "leading" spacing) treats x_T as if it were at its first time, as pipelines do, and pays for the
    part of the trajectory it skips (Lin et al. 2024); and
  * sliced-Wasserstein distance to exact samples of the mixture.
NFE are counted, not assumed (Heun costs two per step). At each NFE budget a method runs the most
steps that fit. diffusers is driven the way its pipelines drive it: scale_model_input, a model that
sees (x_VP, timestep) exactly as a trained network would, then step().

Run by hand, alone on the machine:  python bench/samplers.py [--quick]
Writes bench/results/samplers.json and bench/results/samplers.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import torch

import difflab
from difflab import processes, samplers, schedules
from difflab.analytic import GaussianMixture
from difflab.metrics.distances import sliced_wasserstein
from difflab.metrics.ode_error import endpoint_error
from difflab.samplers import calibration

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
RESULTS = Path(__file__).parent / "results"
NFES = [4, 5, 6, 8, 10, 12, 15, 20, 30, 50]
DTYPE = torch.float64

MIXTURES = {
    "ring2d": lambda: GaussianMixture.ring(num_components=8, radius=1.0, std=0.1),
    "lowrank64": lambda: GaussianMixture.low_rank(dim=64, num_components=8, rank=4, floor=0.02, seed=0),
}
PROCESSES = {
    "sd_vp_eps": (lambda: processes.DiscreteVP.scaled_linear(), "eps"),
    "flow_velocity": (lambda: processes.Flow(), "flow"),
}
DIFFLAB_SAMPLERS = [
    ("ddim", {}), ("heun", {}), ("dpm_2", {}), ("lms", {}), ("ipndm", {}), ("plms", {}), ("pndm", {}),
    ("deis", {}), ("dpm_solver", {"order": 2}), ("dpm_solver", {"order": 3}), ("dpmpp_2s", {}),
    ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"order": 2}), ("unipc", {"order": 3}),
    ("unipc", {"order": 2, "variant": "bh1"}),
]
DIFFLAB_SCHEDULES = [("uniform", {}), ("trailing", {}), ("karras", {}), ("logsnr", {}),
                     ("polynomial", {"rho": 2.0}), ("karras", {"rho": 3.0})]


# --- references -----------------------------------------------------------------------------------
class Problem:
    def __init__(self, mixture: str, process: str, batch: int):
        self.mix = MIXTURES[mixture]()
        make, self.prediction = PROCESSES[process]
        self.process = make()
        self.den = self.mix.denoiser(self.process, self.prediction)
        g = torch.Generator().manual_seed(0)
        self.noise = torch.randn(batch, self.mix.dim, generator=g, dtype=DTYPE)
        self.exact = self.mix.sample(batch, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
        self.x_start = float(self.process.sigma(torch.tensor(1.0, dtype=DTYPE))) * self.noise
        self.reference = self.mix.ode_solve(self.x_start, self.process, 1.0)

    def score(self, out: torch.Tensor) -> dict:
        err = endpoint_error(out, self.reference)
        return {"rmse": err["rmse"], "median": err["median"],
                "sw": sliced_wasserstein(out, self.exact) if torch.isfinite(out).all() else float("nan")}


def _largest_steps(run_nfe, budget: int) -> int | None:
    best = None
    for steps in range(1, budget + 3):
        nfe = run_nfe(steps)
        if nfe is not None and nfe <= budget:
            best = steps
    return best


# --- difflab ----------------------------------------------------------------------------------------
def difflab_rows(pb: Problem, nfes: list[int]) -> list[dict]:
    rows = []
    probe = torch.zeros(1, pb.mix.dim, dtype=DTYPE)
    for name, opts in DIFFLAB_SAMPLERS:
        def count(steps, name=name, opts=opts):
            return samplers.sample(pb.den, probe, name, steps=steps, schedule="karras", return_nfe=True, **opts)[1]

        cache = {s: count(s) for s in range(1, max(nfes) + 3)}
        for sched, sopts in DIFFLAB_SCHEDULES:
            for budget in nfes:
                steps = _largest_steps(lambda s, c=cache: c[s], budget)
                if steps is None:
                    continue
                ts = schedules.get(sched, pb.process, steps, **sopts)
                out, nfe = difflab.sample(pb.den, pb.noise, name, steps=steps, schedule=ts, return_nfe=True, **opts)
                if float(ts[0]) < pb.process.t_max:  # difflab scales x_T by sigma(ts[0]); use the shared x_T
                    out = difflab.sample(pb.den, pb.x_start / float(pb.process.sigma(ts[0])), name,
                                         schedule=ts, **opts)
                label = name + "".join(f" {k}={v}" for k, v in opts.items())
                slabel = sched + "".join(f" {k}={v}" for k, v in sopts.items())
                rows.append({"library": "difflab", "method": label, "schedule": slabel, "budget": budget,
                             "nfe": nfe, "steps": steps, **pb.score(out)})
    return rows


def difflab_optimized_rows(pb: Problem, nfes: list[int], methods: list[tuple[str, dict]]) -> list[dict]:
    """The Align-Your-Steps-like optimizer, tuned on a separate calibration batch."""
    rows = []
    calib = torch.randn(256, pb.mix.dim, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    ref = pb.mix.ode_solve(float(pb.process.sigma(torch.tensor(1.0, dtype=DTYPE))) * calib, pb.process, 1.0)
    for name, opts in methods:
        for budget in nfes:
            grid = calibration.optimize_schedule(pb.den, name, budget, calib, reference=ref, sampler_options=opts,
                                      max_evals=800)
            out, nfe = difflab.sample(pb.den, pb.noise, name, schedule=grid, return_nfe=True, **opts)
            label = name + "".join(f" {k}={v}" for k, v in opts.items())
            rows.append({"library": "difflab", "method": label, "schedule": "optimized", "budget": budget,
                         "nfe": nfe, "steps": budget, **pb.score(out), "grid": grid.tolist()})
    return rows


# --- diffusers --------------------------------------------------------------------------------------
def diffusers_specs(process_key: str) -> list[tuple[str, str, dict]]:
    vp = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              prediction_type="epsilon")
    specs: list[tuple[str, str, dict]] = []
    if process_key == "sd_vp_eps":
        for spacing in ("linspace", "leading", "trailing"):
            specs += [
                ("DDIM", "DDIMScheduler", dict(vp, set_alpha_to_one=True, timestep_spacing=spacing)),
                ("PNDM/PLMS", "PNDMScheduler", dict(vp, skip_prk_steps=True, set_alpha_to_one=True,
                                                    timestep_spacing=spacing)),
                ("Euler", "EulerDiscreteScheduler", dict(vp, timestep_spacing=spacing, final_sigmas_type="zero")),
                ("Heun", "HeunDiscreteScheduler", dict(vp, timestep_spacing=spacing)),
                ("LMS", "LMSDiscreteScheduler", dict(vp, timestep_spacing=spacing)),
                ("KDPM2", "KDPM2DiscreteScheduler", dict(vp, timestep_spacing=spacing)),
            ]
            for order in (2, 3):
                specs += [
                    (f"DPM++{order}M", "DPMSolverMultistepScheduler",
                     dict(vp, solver_order=order, timestep_spacing=spacing, final_sigmas_type="zero")),
                    (f"UniPC-{order} bh2", "UniPCMultistepScheduler",
                     dict(vp, solver_order=order, timestep_spacing=spacing, final_sigmas_type="zero")),
                    (f"UniPC-{order} bh1", "UniPCMultistepScheduler",
                     dict(vp, solver_order=order, solver_type="bh1", timestep_spacing=spacing,
                          final_sigmas_type="zero")),
                    (f"DEIS-{order}", "DEISMultistepScheduler", dict(vp, solver_order=order, timestep_spacing=spacing)),
                ]
        for sig in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            tag = sig.split("_")[1]
            specs += [
                (f"Euler {tag}", "EulerDiscreteScheduler", dict(vp, **{sig: True}, final_sigmas_type="zero")),
                (f"Heun {tag}", "HeunDiscreteScheduler", dict(vp, **{sig: True})),
                (f"LMS {tag}", "LMSDiscreteScheduler", dict(vp, **{sig: True})),
                (f"KDPM2 {tag}", "KDPM2DiscreteScheduler", dict(vp, **{sig: True})),
            ]
            for order in (2, 3):
                specs += [
                    (f"DPM++{order}M {tag}", "DPMSolverMultistepScheduler",
                     dict(vp, solver_order=order, **{sig: True}, final_sigmas_type="zero")),
                    (f"DPM++{order}M heun-type {tag}", "DPMSolverMultistepScheduler",
                     dict(vp, solver_order=order, solver_type="heun", **{sig: True}, final_sigmas_type="zero")),
                    (f"UniPC-{order} bh2 {tag}", "UniPCMultistepScheduler",
                     dict(vp, solver_order=order, **{sig: True}, final_sigmas_type="zero")),
                    (f"UniPC-{order} bh1 {tag}", "UniPCMultistepScheduler",
                     dict(vp, solver_order=order, solver_type="bh1", **{sig: True}, final_sigmas_type="zero")),
                    (f"DEIS-{order} {tag}", "DEISMultistepScheduler", dict(vp, solver_order=order, **{sig: True})),
                    (f"DPM-Solver-{order}S {tag}", "DPMSolverSinglestepScheduler",
                     dict(vp, solver_order=order, **{sig: True}, final_sigmas_type="zero")),
                ]
        specs += [("DPM++2M lu-lambdas", "DPMSolverMultistepScheduler",
                   dict(vp, solver_order=2, use_lu_lambdas=True, final_sigmas_type="zero"))]
        specs += [(f"DPM-Solver-{o}S", "DPMSolverSinglestepScheduler",
                   dict(vp, solver_order=o, final_sigmas_type="zero")) for o in (2, 3)]
    else:
        flow = dict(num_train_timesteps=1000)
        specs += [("FlowMatch Euler", "FlowMatchEulerDiscreteScheduler", dict(flow, shift=1.0)),
                  ("FlowMatch Heun", "FlowMatchHeunDiscreteScheduler", dict(flow, shift=1.0))]
        for sig in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            specs += [(f"FlowMatch Euler {sig.split('_')[1]}", "FlowMatchEulerDiscreteScheduler",
                       dict(flow, shift=1.0, **{sig: True}))]
        fl = dict(flow, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
        for order in (2, 3):
            specs += [
                (f"DPM++{order}M flow", "DPMSolverMultistepScheduler", dict(fl, solver_order=order,
                                                                            final_sigmas_type="zero")),
                (f"DPM++{order}M heun-type flow", "DPMSolverMultistepScheduler",
                 dict(fl, solver_order=order, solver_type="heun", final_sigmas_type="zero")),
                (f"UniPC-{order} bh2 flow", "UniPCMultistepScheduler", dict(fl, solver_order=order,
                                                                            final_sigmas_type="zero")),
                (f"UniPC-{order} bh1 flow", "UniPCMultistepScheduler",
                 dict(fl, solver_order=order, solver_type="bh1", final_sigmas_type="zero")),
                (f"DEIS-{order} flow", "DEISMultistepScheduler", dict(fl, solver_order=order)),
                (f"DPM-Solver-{order}S flow", "DPMSolverSinglestepScheduler",
                 dict(fl, solver_order=order, final_sigmas_type="zero")),
            ]
    return specs


def _diffusers_run(pb: Problem, cls_name: str, kwargs: dict, steps: int, *, dry: bool = False):
    import diffusers

    sched = getattr(diffusers, cls_name)(**kwargs)
    sched.set_timesteps(steps)
    proc, n_train = pb.process, 1000
    is_flow = isinstance(proc, processes.Flow)

    def t_of(timestep) -> float:
        ts = float(timestep)
        return ts / n_train if is_flow else (ts + 1) / n_train

    t0 = t_of(sched.timesteps[0])
    x_vp = pb.x_start if not dry else torch.zeros(1, pb.mix.dim, dtype=DTYPE)
    # samplers that keep their state in the VE form x / alpha say so through init_noise_sigma > 1
    ve_form = float(getattr(sched, "init_noise_sigma", 1.0)) > 1.0 + 1e-6
    sample = x_vp / float(proc.alpha(torch.tensor(t0, dtype=DTYPE))) if ve_form else x_vp.clone()
    calls = 0
    for timestep in sched.timesteps:
        model_in = sched.scale_model_input(sample, timestep)
        calls += 1
        if dry:
            out = torch.zeros_like(model_in)
        else:
            t = torch.tensor(t_of(timestep), dtype=DTYPE)
            a, s = float(proc.alpha(t)), float(proc.sigma(t))
            x0 = pb.mix.denoise(model_in, a, s)
            eps = (model_in - a * x0) / s
            out = eps - x0 if is_flow else eps
        sample = sched.step(out, timestep, sample).prev_sample
    return (None if dry else sample.to(DTYPE)), calls


def diffusers_rows(pb: Problem, process_key: str, nfes: list[int]) -> list[dict]:
    rows = []
    for label, cls_name, kwargs in diffusers_specs(process_key):
        cache = {}
        for s in range(1, max(nfes) + 3):
            try:
                cache[s] = _diffusers_run(pb, cls_name, kwargs, s, dry=True)[1]
            except Exception:
                cache[s] = None
        spacing = kwargs.get("timestep_spacing", "")
        for budget in nfes:
            steps = _largest_steps(lambda s, c=cache: c[s], budget)
            if steps is None:
                continue
            try:
                out, nfe = _diffusers_run(pb, cls_name, kwargs, steps)
                score = pb.score(out)
            except Exception as exc:  # a scheduler that fails at this step count is a result too
                nfe, score = cache[steps], {"rmse": float("nan"), "median": float("nan"), "sw": float("nan"),
                                            "error": repr(exc)[:200]}
            rows.append({"library": "diffusers", "method": label, "schedule": spacing, "budget": budget,
                         "nfe": nfe, "steps": steps, **score})
    return rows


# --- report -----------------------------------------------------------------------------------------
def best(rows: list[dict], library: str, budget: int, key: str = "rmse") -> dict | None:
    ok = [r for r in rows if r["library"] == library and r["budget"] == budget and math.isfinite(r[key])]
    return min(ok, key=lambda r: r[key]) if ok else None


def markdown(all_rows: dict[str, list[dict]], nfes: list[int], meta: dict) -> str:
    lines = ["# Samplers: difflab vs diffusers on exact answers", "",
             f"diffusers {meta['diffusers']}, torch {meta['torch']}, float64, batch {meta['batch']}; "
             "RMSE per dimension to the exact ODE endpoint from the same noise (lower is better). "
             "Ratio = diffusers' best / difflab's best; the target is >= 2 from NFE 5 to 20.", ""]
    for setup, rows in all_rows.items():
        lines += [f"## {setup}", "", "| NFE | difflab best | RMSE | diffusers best | RMSE | ratio | "
                  "difflab SW | diffusers SW | NaN configs (diffusers) |",
                  "|---:|---|---:|---|---:|---:|---:|---:|---:|"]
        for budget in nfes:
            a, b = best(rows, "difflab", budget), best(rows, "diffusers", budget)
            if a is None or b is None:
                continue
            nan = sum(1 for r in rows if r["library"] == "diffusers" and r["budget"] == budget
                      and not math.isfinite(r["rmse"]))
            sw_a = min(r["sw"] for r in rows if r["library"] == "difflab" and r["budget"] == budget
                       and math.isfinite(r["sw"]))
            sw_b = min(r["sw"] for r in rows if r["library"] == "diffusers" and r["budget"] == budget
                       and math.isfinite(r["sw"]))
            lines.append(f"| {budget} | {a['method']} / {a['schedule']} | {a['rmse']:.2e} | "
                         f"{b['method']} {b['schedule']} | {b['rmse']:.2e} | {b['rmse'] / a['rmse']:.1f}x | "
                         f"{sw_a:.4f} | {sw_b:.4f} | {nan} |")
        lines += ["", "Median per-sample error (robust to the few trajectories that end in another mode):", "",
                  "| NFE | difflab best | median | diffusers best | median | ratio |", "|---:|---|---:|---|---:|---:|"]
        for budget in nfes:
            a, b = best(rows, "difflab", budget, "median"), best(rows, "diffusers", budget, "median")
            if a is not None and b is not None:
                lines.append(f"| {budget} | {a['method']} / {a['schedule']} | {a['median']:.2e} | {b['method']} "
                             f"{b['schedule']} | {b['median']:.2e} | {b['median'] / a['median']:.1f}x |")
        lines.append("")
    nan_rows = [r for rows in all_rows.values() for r in rows if not math.isfinite(r["rmse"])]
    dl_nan = [r for r in nan_rows if r["library"] == "difflab"]
    failing = sorted({r["method"] for r in nan_rows if r["library"] == "diffusers"})
    lines += [f"difflab combinations with NaN: {len(dl_nan)}. diffusers configurations with NaN or failure: "
              f"{len(nan_rows) - len(dl_nan)} ({', '.join(failing)})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small batches and fewer NFE, for a smoke run")
    parser.add_argument("--no-optimized", action="store_true")
    args = parser.parse_args()
    nfes = [5, 10, 20] if args.quick else NFES
    batch = {"ring2d": 2000, "lowrank64": 512} if not args.quick else {"ring2d": 200, "lowrank64": 64}
    all_rows: dict[str, list[dict]] = {}
    started = time.time()
    for mix_key in MIXTURES:
        for proc_key in PROCESSES:
            pb = Problem(mix_key, proc_key, batch[mix_key])
            setup = f"{mix_key} / {proc_key}"
            t = time.time()
            rows = difflab_rows(pb, nfes) + diffusers_rows(pb, proc_key, nfes)
            if not args.no_optimized:
                rows += difflab_optimized_rows(pb, [n for n in nfes if 4 <= n <= 20],
                                               [("unipc", {"order": 2}), ("deis", {})])
            all_rows[setup] = rows
            print(f"{setup}: {len(rows)} runs in {time.time() - t:.0f}s", flush=True)
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "batch": batch,
            "seconds": round(time.time() - started), "nfes": nfes}
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"samplers{suffix}.json").write_text(json.dumps({"meta": meta, "rows": all_rows}, indent=1))
    (RESULTS / f"samplers{suffix}.md").write_text(markdown(all_rows, nfes, meta))
    print(markdown(all_rows, nfes, meta))


if __name__ == "__main__":
    main()
