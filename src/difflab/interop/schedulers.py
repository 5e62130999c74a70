"""A diffusers scheduler config (``scheduler_config.json``) as a difflab process, prediction and
sampling defaults.

A diffusers scheduler mixes three things difflab keeps apart: the noise process the model was
trained with (betas, number of train steps, zero-terminal-SNR rescale, flow shift), what the
network predicts (``prediction_type``) and how to sample (spacing, offset, Karras sigmas). The
conversion returns each where it belongs and lists every key it did not use, with the reason, so
nothing is dropped silently. Conventions that change what the network sees are kept exactly: a
discrete VP model is fed the training index ``i`` at ``t = (i + 1) / N``; a flow model
``sigma * num_train_timesteps``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflab import predictions, processes

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
#: keys that only shape diffusers' own sampling loop; difflab's samplers have their own options
SAMPLING_ONLY = {"clip_sample", "clip_sample_range", "set_alpha_to_one", "skip_prk_steps", "solver_order",
                 "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_lu_lambdas",
                 "lambda_min_clipped", "variance_type", "final_sigmas_type", "predict_x0", "disable_corrector",
                 "solver_p", "timestep_type", "interpolation_type", "sigma_min", "sigma_max", "use_beta_sigmas",
                 "use_exponential_sigmas", "invert_sigmas", "shift_terminal", "stochastic_sampling",
                 "dynamic_thresholding_ratio", "sample_max_value", "use_flow_sigmas", "flow_shift", "steps_offset",
                 "timestep_spacing", "use_karras_sigmas", "time_shift_type", "base_shift", "max_shift",
                 "base_image_seq_len", "max_image_seq_len", "use_dynamic_shifting"}


class ConversionError(ValueError):
    """A config difflab cannot express; the message names the key and what is missing."""


@dataclass
class SchedulerConversion:
    """The process, prediction and sampling defaults of a diffusers scheduler config, and the keys
    that only mattered to diffusers' own sampling loop (``ignored``, key -> why)."""

    process: processes.Process
    prediction: predictions.Prediction
    schedule: str = "uniform"
    schedule_options: dict[str, Any] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)


def _read(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / "scheduler_config.json"
    from difflab.files import read_json

    out = read_json(path, "diffusers scheduler config")
    if not isinstance(out, dict):
        raise ConversionError(f"{path} is not a scheduler config (a JSON object)")
    return out


def scheduler_from_diffusers(config: dict[str, Any] | str | os.PathLike, *,
                             image_seq_len: int | None = None) -> SchedulerConversion:
    """Convert a diffusers scheduler config (a dict, the JSON file or its folder). A flow scheduler
    with ``use_dynamic_shifting`` needs the image's token count ``image_seq_len`` (Flux's shift)."""
    cfg = _read(config)
    name = cfg.get("_class_name", "")
    steps = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("thresholding"):
        raise ConversionError("thresholding=true (dynamic thresholding of x0) is not supported by difflab's "
                              "samplers; set it to false to convert")
    kind = cfg.get("prediction_type", "flow_prediction" if name in FLOW_SCHEDULERS else "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ConversionError(f"prediction_type {kind!r} has no difflab prediction; known: "
                              f"{', '.join(PREDICTION_TYPES)}")
    is_flow = name in FLOW_SCHEDULERS or kind == "flow_prediction" or cfg.get("use_flow_sigmas")
    if is_flow:
        process = _flow_process(cfg, steps, image_seq_len)
        kind = "flow_prediction"
    else:
        process = _discrete_vp(cfg, steps)
    prediction = predictions.get(PREDICTION_TYPES[kind])
    schedule, options = _schedule(cfg, steps, is_flow)
    used = {"_class_name", "_diffusers_version", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
            "trained_betas", "rescale_betas_zero_snr", "prediction_type", "shift", "thresholding"}
    ignored = {k: "only diffusers' own sampling loop uses it (difflab's samplers have their own options)"
               for k in cfg if k not in used and k in SAMPLING_ONLY}
    unknown = sorted(k for k in cfg if k not in used and k not in SAMPLING_ONLY)
    ignored.update({k: "not a key difflab knows; check that it does not change the process" for k in unknown})
    return SchedulerConversion(process, prediction, schedule, options, ignored)


def _discrete_vp(cfg: dict[str, Any], steps: int) -> processes.Process:
    zero_snr = bool(cfg.get("rescale_betas_zero_snr", False))
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0)
        if zero_snr:
            abar = processes.rescale_zero_terminal_snr(abar)
        return processes.DiscreteVP(abar)
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in processes.BETA_SCHEDULES:
        raise ConversionError(f"beta_schedule {schedule!r} is not one difflab has "
                              f"({', '.join(processes.BETA_SCHEDULES)}); give trained_betas instead")
    return processes.DiscreteVP.from_schedule(schedule, steps, beta_start=float(cfg.get("beta_start", 1e-4)),
                                              beta_end=float(cfg.get("beta_end", 0.02)), zero_terminal_snr=zero_snr)


def _flow_process(cfg: dict[str, Any], steps: int, image_seq_len: int | None) -> processes.Process:
    if cfg.get("use_dynamic_shifting"):
        if cfg.get("time_shift_type", "exponential") != "exponential":
            raise ConversionError(f"time_shift_type {cfg['time_shift_type']!r}: only Flux's exponential shift is "
                                  "supported")
        if image_seq_len is None:
            raise ConversionError("this flow scheduler shifts with the image size (use_dynamic_shifting): pass "
                                  "image_seq_len, the number of image tokens of the size you will sample")
        return processes.Flow.for_sequence_length(
            image_seq_len, base_len=int(cfg.get("base_image_seq_len", 256)),
            max_len=int(cfg.get("max_image_seq_len", 4096)), base_shift=float(cfg.get("base_shift", 0.5)),
            max_shift=float(cfg.get("max_shift", 1.15)), time_scale=float(steps), t_min=1.0 / steps)
    shift = float(cfg.get("flow_shift", 1.0) if cfg.get("use_flow_sigmas") else cfg.get("shift", 1.0))
    return processes.Flow(shift=shift, time_scale=float(steps), t_min=1.0 / steps)


def _schedule(cfg: dict[str, Any], steps: int, is_flow: bool) -> tuple[str, dict[str, Any]]:
    if cfg.get("use_karras_sigmas"):
        return "karras", {}
    spacing = cfg.get("timestep_spacing", "linspace")
    if is_flow:
        return "uniform", {}
    if spacing == "leading":
        return "leading", {"offset": int(cfg.get("steps_offset", 0))}
    if spacing == "trailing":
        return "trailing", {}
    return "uniform", {}


def scheduler_to_diffusers(process: processes.Process, prediction: predictions.Prediction | str,
                           spacing: str = "leading") -> dict[str, Any]:
    """The diffusers scheduler config of a difflab process and prediction (the inverse of
    :func:`scheduler_from_diffusers`): a discrete VP process as a ``DDPMScheduler`` (its named beta
    schedule, else its betas), a flow process as a ``FlowMatchEulerDiscreteScheduler``; a
    :class:`ConversionError` for a process diffusers' schedulers cannot express."""
    prediction = predictions.get(prediction)
    kinds = {v: k for k, v in PREDICTION_TYPES.items()}
    if isinstance(process, processes.Flow):
        if prediction.name != "flow":
            raise ConversionError(f"a flow process with {prediction.name!r} prediction: diffusers' flow schedulers "
                                  "take the velocity (flow) prediction only")
        steps = round(process.time_scale)
        if steps != process.time_scale or abs(process.t_min * steps - 1) > 1e-9:
            raise ConversionError(f"a flow process fed {process.time_scale} x sigma with t_min {process.t_min}: "
                                  "diffusers feeds num_train_timesteps x sigma and starts at 1 / num_train_timesteps")
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": steps,
                "shift": process.shift}
    if not isinstance(process, processes.DiscreteVP):
        raise ConversionError(f"a {process.name!r} process has no diffusers scheduler; diffusers' DDPM-family "
                              "schedulers are discrete VP (DiscreteVP) and its flow schedulers rectified flow (Flow)")
    if prediction.name not in kinds:
        raise ConversionError(f"the {prediction.name!r} prediction has no diffusers prediction_type (it has "
                              f"{', '.join(PREDICTION_TYPES)})")
    cfg = process.config()
    out: dict[str, Any] = {"_class_name": "DDPMScheduler", "num_train_timesteps": process.num_train_steps,
                           "prediction_type": kinds[prediction.name], "clip_sample": False,
                           "timestep_spacing": spacing}
    if cfg.get("beta_schedule") in processes.BETA_SCHEDULES:
        out.update({"beta_schedule": cfg["beta_schedule"],
                    "rescale_betas_zero_snr": bool(cfg.get("zero_terminal_snr"))})
        out.update({k: cfg[k] for k in ("beta_start", "beta_end") if k in cfg})
    else:
        out["trained_betas"] = process.betas.tolist()
    return out
