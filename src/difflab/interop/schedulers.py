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
