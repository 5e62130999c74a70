"""Training configuration: TOML recipes with defaults, ``--set key=value`` overrides, and errors
that name unknown keys."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "out_dir": "outputs/run",
    "data": {"name": "digits", "options": {}, "batch_size": 64},
    "model": {"kind": "unet"},
    "process": {"kind": "flow"},
    "prediction": "flow",
    "loss": {"weighting": "none", "t_distribution": "", "cond_dropout": 0.1, "immiscible": False,
             "min_snr_gamma": 5.0},
    "optim": {"lr": 2e-4, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "warmup_steps": 100,
              "schedule": "cosine", "grad_clip": 1.0, "accumulate": 1},
    "ema": {"decay": 0.999, "warmup": True},
    "train": {"steps": 1000, "checkpoint_every": 500, "keep_last": 2, "log_every": 50, "sample_every": 0,
              "mixed_precision": "no", "num_threads": 0, "tensorboard": True},
    "text": {"encoder": "", "max_tokens": 16},
    "latent": {"vae": "", "train_steps": 0, "batch_size": 32, "lr": 1e-3, "kl_weight": 1e-6, "model": {}},
    "sample": {"sampler": "dpmpp_2m", "steps": 20, "schedule": "karras", "n": 64, "guidance": "none",
               "guidance_options": {}},
}
#: sections whose keys are free (they are passed on to another component's own config)
OPEN_SECTIONS = ("data.options", "model", "process", "sample.guidance_options", "latent.model")
#: keys a resumed run may change without breaking exactness (and every sample.* key)
RESUMABLE_CHANGES = ("out_dir", "train.checkpoint_every", "train.keep_last", "train.log_every",
                     "train.sample_every", "train.num_threads", "train.tensorboard")


class ConfigError(ValueError):
    pass


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{prefix}{key}"
        if path.rstrip(".") in OPEN_SECTIONS or any(path.startswith(s + ".") for s in OPEN_SECTIONS):
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
            continue
        if key not in base:
            valid = ", ".join(f"{prefix}{k}" for k in base)
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {valid}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; give it a table, not {value!r}")
            out[key] = _merge(base[key], value, f"{path}.")
        else:
            out[key] = value
    return out


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def parse_value(text: str) -> Any:
    """A --set value as TOML would read it (numbers, booleans, strings, arrays)."""
    tomllib = _toml()

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Defaults, then the TOML file (a path or a built-in recipe name), then ``key.sub=value`` overrides."""
    tomllib = _toml()

    update: dict[str, Any] = {}
    if path is not None:
        from difflab import recipes

        path = recipes.resolve(path)
        try:
            update = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from err
    config = _merge(DEFAULTS, update)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        key, text = item.split("=", 1)
        nested: dict[str, Any] = {}
        cur = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = parse_value(text.strip())
        config = _merge(config, nested)
    return config


def complete(config: dict) -> dict:
    """A saved config with the defaults of keys added since it was written."""
    return _merge(DEFAULTS, config)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(saved: dict, current: dict) -> list[str]:
    """Fields that differ between two configs, ignoring those a resume may change."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    return [f"{k}: checkpoint {a.get(k, '<absent>')!r} vs now {b.get(k, '<absent>')!r}"
            for k in keys if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES and not k.startswith("sample.")
            and json.dumps(a.get(k)) != json.dumps(b.get(k))]
