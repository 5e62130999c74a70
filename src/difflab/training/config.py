"""Training configuration: TOML recipes with defaults, ``--set key=value`` overrides, and errors
that name unknown keys."""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from typing import Any

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "out_dir": "outputs/run",
    "data": {"name": "digits", "options": {}, "batch_size": 64},
    "model": {"kind": "unet"},
    "process": {"kind": "flow"},
    "prediction": "flow",
    "loss": {"weighting": "none", "t_distribution": "", "cond_dropout": 0.1, "immiscible": False,
             "min_snr_gamma": 5.0, "task": "generate", "full_mask_rate": 0.25},
    "optim": {"lr": 2e-4, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "warmup_steps": 100,
              "schedule": "cosine", "grad_clip": 1.0, "accumulate": 1},
    "ema": {"decay": 0.999, "warmup": True},
    "train": {"steps": 1000, "checkpoint_every": 500, "keep_last": 2, "log_every": 50, "sample_every": 0,
              "mixed_precision": "no", "num_threads": 0, "tensorboard": True,
              "divergence": "stop", "divergence_factor": 100.0, "divergence_patience": 20, "init": ""},
    "text": {"encoder": "", "max_tokens": 16},
    "latent": {"vae": "", "train_steps": 0, "batch_size": 32, "lr": 1e-3, "kl_weight": 1e-6, "model": {}},
    "sample": {"sampler": "dpmpp_2m", "steps": 20, "schedule": "karras", "n": 64, "guidance": "none",
               "guidance_options": {}},
    # distillation (difflab.training.distill): a student trained from a teacher pipeline
    "distill": {"method": "", "teacher": "", "guidance_scale": 1.0, "options": {}},
}
#: sections whose keys are free (they are passed on to another component's own config)
OPEN_SECTIONS = ("data.options", "model", "process", "sample.guidance_options", "latent.model", "distill.options")
#: keys a resumed run may change without breaking exactness (and every sample.* key)
RESUMABLE_CHANGES = ("out_dir", "train.checkpoint_every", "train.keep_last", "train.log_every",
                     "train.sample_every", "train.num_threads", "train.tensorboard", "train.divergence",
                     "train.divergence_factor", "train.divergence_patience")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    """What a config key may hold: its type (from its default), an optional range and choices."""

    low: float | None = None
    high: float | None = None
    high_open: bool = False
    low_open: bool = False
    choices: tuple[str, ...] | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)

    def allows(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


POSITIVE, AT_LEAST_ONE, NON_NEGATIVE = Rule(0, low_open=True), Rule(1), Rule(0)
UNIT_OPEN = Rule(0, 1, high_open=True)
#: ranges and choices beyond each key's type (the type is its default's)
RULES: dict[str, Rule] = {
    "seed": NON_NEGATIVE, "data.batch_size": AT_LEAST_ONE,
    "loss.weighting": Rule(choices=("none", "min_snr", "edm")),
    "loss.t_distribution": Rule(choices=("", "uniform", "discrete", "logit_normal", "log_normal", "log_uniform")),
    "loss.cond_dropout": UNIT_OPEN, "loss.min_snr_gamma": POSITIVE,
    "loss.task": Rule(choices=("generate", "inpaint")), "loss.full_mask_rate": Rule(0, 1),
    "optim.lr": POSITIVE, "optim.weight_decay": NON_NEGATIVE, "optim.beta1": UNIT_OPEN, "optim.beta2": UNIT_OPEN,
    "optim.warmup_steps": NON_NEGATIVE, "optim.schedule": Rule(choices=("cosine", "constant", "linear")),
    "optim.grad_clip": NON_NEGATIVE, "optim.accumulate": AT_LEAST_ONE, "ema.decay": UNIT_OPEN,
    "train.steps": AT_LEAST_ONE, "train.checkpoint_every": AT_LEAST_ONE, "train.keep_last": AT_LEAST_ONE,
    "train.log_every": AT_LEAST_ONE, "train.sample_every": NON_NEGATIVE,
    "train.mixed_precision": Rule(choices=("no", "bf16", "fp16")), "train.num_threads": NON_NEGATIVE,
    "train.divergence": Rule(choices=("stop", "warn", "off")), "train.divergence_factor": Rule(1, low_open=True),
    "train.divergence_patience": AT_LEAST_ONE,
    "text.max_tokens": AT_LEAST_ONE, "latent.train_steps": NON_NEGATIVE, "latent.batch_size": AT_LEAST_ONE,
    "latent.lr": POSITIVE, "latent.kl_weight": NON_NEGATIVE, "sample.steps": AT_LEAST_ONE, "sample.n": AT_LEAST_ONE,
    "distill.guidance_scale": Rule(1),
}
#: an adapter recipe (``difflab adapt``): a LoRA, an LCM-LoRA (``[consistency]``) or a ControlNet
#: trained on a frozen base pipeline
ADAPTER_DEFAULTS: dict[str, Any] = {
    "kind": "lora",
    "base": "",
    "out_dir": "outputs/adapter",
    "seed": 0,
    "data": {"name": "folder", "options": {}, "control": ""},
    "lora": {"rank": 4, "alpha": 0.0, "targets": ["*.to_q", "*.to_k", "*.to_v", "*.to_out"], "dropout": 0.0},
    "controlnet": {"hint_width": 16, "blocks": 0},
    "consistency": {"solver": "heun", "schedule": "karras", "steps_start": 10, "steps_end": 40, "skip": 1,
                    "huber_c": -1.0, "teacher_scale": 1.0},
    "prior": {"prompts": [], "n": 0, "weight": 1.0, "steps": 20},
    "train": {"steps": 1000, "batch_size": 32, "lr": 1e-4, "text_dropout": 0.1, "num_threads": 0},
}
ADAPTER_RULES: dict[str, Rule] = {
    "kind": Rule(choices=("lora", "lcm_lora", "controlnet")), "seed": NON_NEGATIVE, "lora.rank": AT_LEAST_ONE,
    "lora.alpha": NON_NEGATIVE, "lora.dropout": Rule(0, 1, high_open=True), "controlnet.hint_width": AT_LEAST_ONE,
    "controlnet.blocks": NON_NEGATIVE, "prior.n": NON_NEGATIVE, "prior.weight": NON_NEGATIVE,
    "prior.steps": AT_LEAST_ONE, "train.steps": AT_LEAST_ONE, "train.batch_size": AT_LEAST_ONE,
    "train.lr": POSITIVE, "train.text_dropout": UNIT_OPEN, "train.num_threads": NON_NEGATIVE,
    "consistency.solver": Rule(choices=("euler", "heun")), "consistency.steps_start": AT_LEAST_ONE,
    "consistency.steps_end": AT_LEAST_ONE, "consistency.skip": AT_LEAST_ONE, "consistency.teacher_scale": Rule(1),
}
TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", list: "a list"}


@dataclass(frozen=True)
class Schema:
    """A kind of config: its defaults (which give every key its type), rules, and the sections
    whose keys are free (passed on to another component that checks them)."""

    defaults: dict[str, Any]
    rules: dict[str, Rule]
    open_sections: tuple[str, ...] = ()
    free_keys: tuple[str, ...] = ()


TRAINING = Schema(DEFAULTS, RULES, OPEN_SECTIONS, ("prediction",))
ADAPTER = Schema(ADAPTER_DEFAULTS, ADAPTER_RULES, ("data.options",))


def schema(kind: Schema = TRAINING) -> dict[str, tuple[type, Rule | None]]:
    """Every checked key with its type and rule (open sections are passed on and checked there)."""
    out = {}
    for key, default in flatten(kind.defaults).items():
        if any(key == s or key.startswith(s + ".") for s in kind.open_sections) or key in kind.free_keys:
            continue
        out[key] = (type(default), kind.rules.get(key))
    return out


def validate(config: dict, origins: dict[str, str] | None = None, kind: Schema = TRAINING) -> dict:
    """Check every key's type, range and allowed values; the error names the key, where its value
    came from (the file, --set or the defaults), what was given and what is allowed."""
    flat = flatten(config)
    for key, (kind_, rule) in schema(kind).items():
        if key not in flat:
            continue
        value, where = flat[key], (origins or {}).get(key, "the config")
        ok = isinstance(value, kind_) and not (kind_ is int and isinstance(value, bool))
        if kind_ is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            raise ConfigError(f"{key} must be {TYPE_NAMES.get(kind_, kind_.__name__)}, got {value!r} ({where})")
        if rule is not None and not rule.allows(value):
            raise ConfigError(f"{key} must be {rule.describe()}, got {value!r} ({where})")
    prediction = config.get("prediction")
    if kind is TRAINING and not isinstance(prediction, str | dict):
        raise ConfigError(f"prediction must be a name or a table, got {prediction!r}")
    return config


def _merge(base: dict, update: dict, prefix: str = "", open_sections: tuple[str, ...] = OPEN_SECTIONS) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{prefix}{key}"
        if path.rstrip(".") in open_sections or any(path.startswith(s + ".") for s in open_sections):
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
            out[key] = _merge(base[key], value, f"{path}.", open_sections)
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


def parse_assignment(item: str) -> tuple[str, Any]:
    """``"key=value"`` (``--set``, ``--guidance-option``, ``--accelerator-option``) as (key, value),
    the value read as TOML would read it."""
    if "=" not in item:
        raise ConfigError(f"expected key=value, got {item!r}")
    key, text = item.split("=", 1)
    return key.strip(), parse_value(text.strip())


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
         kind: Schema = TRAINING) -> dict[str, Any]:
    """Defaults, then the TOML file (a path or a built-in recipe name), then ``key.sub=value``
    overrides, checked: a training recipe, or with ``kind=ADAPTER`` an adapter recipe."""
    tomllib = _toml()

    update: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        from difflab import recipes

        path = recipes.resolve(path)
        try:
            update = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from err
    config = _merge(kind.defaults, update, open_sections=kind.open_sections)
    origins.update(dict.fromkeys(flatten(update), f"in {path}"))
    for item in overrides or []:
        key, value = parse_assignment(item)
        nested: dict[str, Any] = {}
        cur = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
        config = _merge(config, nested, open_sections=kind.open_sections)
        origins[key] = f"from --set {item}"
    return validate(config, origins, kind)


def complete(config: dict) -> dict:
    """A saved config with the defaults of keys added since it was written, checked."""
    return validate(_merge(DEFAULTS, config), dict.fromkeys(flatten(config), "in the saved config"))


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
