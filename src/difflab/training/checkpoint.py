"""Training checkpoints: safetensors for model, EMA and optimizer tensors; JSON for the rest.

A checkpoint is a directory ``step_NNNNNNNN`` written under a temporary name and renamed into place,
so an interrupted write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from difflab.files import FileError, load_state, load_tensors, read_json, save_tensors


def _flat_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, st in state["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflat_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def path_of(out_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in a run directory."""
    return Path(out_dir) / "checkpoints" / f"step_{step:08d}"


def save(out_dir: Path, step: int, *, model: torch.nn.Module, ema: torch.nn.Module | None,
         optimizer: torch.optim.Optimizer, scheduler: Any, config: dict, keep_last: int = 2,
         extra: dict | None = None, files: dict[str, bytes] | None = None) -> Path:
    """Write checkpoint ``step`` (weights, EMA, optimizer, schedule, RNG; ``files`` beside them, such
    as the ``pipeline.json`` that export reads) under a temporary name, then rename it into place."""
    final = path_of(out_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_tensors(tmp / "model.safetensors", model.state_dict())
    if ema is not None:
        save_tensors(tmp / "ema.safetensors", ema.state_dict())
    opt_tensors, opt_meta = _flat_optimizer(optimizer.state_dict())
    save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    trainer = {"step": step, "config": config, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
               "cpu_rng": torch.get_rng_state().tolist(), **(extra or {})}
    for name, data in (files or {}).items():
        (tmp / name).write_bytes(data)
    (tmp / "trainer.json").write_text(json.dumps(trainer))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def all_checkpoints(out_dir: Path) -> list[Path]:
    """The run's complete-looking checkpoints (they have a trainer.json), oldest first."""
    return sorted(p for p in (Path(out_dir) / "checkpoints").glob("step_*") if (p / "trainer.json").is_file())


def latest(out_dir: Path) -> Path | None:
    found = all_checkpoints(out_dir)
    return found[-1] if found else None


def read_record(path: Path) -> dict:
    """A checkpoint's ``trainer.json`` (step, config, optimizer and scheduler state, RNG), checked."""
    record = read_json(path / "trainer.json", "checkpoint record")
    missing = [k for k in ("step", "config", "optimizer", "scheduler", "cpu_rng") if k not in record]
    if missing:
        raise FileError(f"{path / 'trainer.json'} lacks {', '.join(missing)}: the checkpoint is damaged")
    return record


def load_weights(path: Path, *, model: torch.nn.Module, ema: torch.nn.Module | None) -> None:
    """The model's and the EMA's weights of a checkpoint, each checked against its target (a
    checkpoint without its EMA is refused: resuming would continue from the random initial EMA)."""
    load_state(model, load_tensors(path / "model.safetensors", "checkpoint weights"), str(path / "model.safetensors"))
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise FileError(f"{path} has no ema.safetensors: the checkpoint is incomplete; resume from the one before")
        load_state(ema, load_tensors(path / "ema.safetensors", "checkpoint EMA weights"), str(path / "ema.safetensors"))


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                   source: str) -> None:
    """Restore a saved optimizer state, each tensor checked against its parameter and put in the
    parameter's memory layout.

    The layout matters: fused AdamW walks a parameter and its moments element by element in memory
    order, so a contiguous ``exp_avg`` beside a channels-last convolution weight pairs each moment
    with the wrong weight (the state dict stores them contiguous)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = _unflat_optimizer(tensors, meta)
    unknown = sorted(pid for pid in state["state"] if not 0 <= pid < len(params))
    if unknown or len(meta["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"{source}: the optimizer state is for another model ({len(state['state'])} parameters with "
                         f"state, ids up to {max(state['state'], default=-1)}; this model has {len(params)}). "
                         "Resume with the config that made the checkpoint, or start a new run.")
    for pid, entries in state["state"].items():
        param = params[pid]
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                continue  # step counters
            if value.shape != param.shape:
                raise ValueError(f"{source}: optimizer state {pid}.{key} has shape {tuple(value.shape)} but its "
                                 f"parameter has {tuple(param.shape)}: the checkpoint is from another model.")
            if not value.dtype.is_floating_point:
                raise ValueError(f"{source}: optimizer state {pid}.{key} has dtype {value.dtype}, expected a float")
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def load_network(path: Path, network: torch.nn.Module, *, ema: bool = True) -> None:
    """A checkpoint's EMA (or, with ``ema=False``, raw) weights onto a bare network, checked."""
    if not ema:
        weights = load_tensors(path / "model.safetensors", "checkpoint weights")
        load_state(network, weights, str(path / "model.safetensors"))
        return
    # an AveragedModel's state: module.* and its update count
    averaged = load_tensors(path / "ema.safetensors", "checkpoint EMA weights")
    weights = {k[len("module."):]: v for k, v in averaged.items() if k.startswith("module.")}
    load_state(network, weights, str(path / "ema.safetensors"))


def load(path: Path, *, model: torch.nn.Module, ema: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
         scheduler: Any) -> dict:
    """Everything a resumed run needs: weights, optimizer, LR schedule and the CPU RNG."""
    trainer = read_record(path)
    load_weights(path, model=model, ema=ema)
    load_optimizer(optimizer, load_tensors(path / "optimizer.safetensors", "optimizer state"), trainer["optimizer"],
                   str(path / "optimizer.safetensors"))
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(torch.tensor(trainer["cpu_rng"], dtype=torch.uint8))
    return trainer


def auxiliary_files(parts: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]) -> dict[str, bytes]:
    """An objective's own networks and optimizers (DMD2's fake score network) as checkpoint files:
    ``aux_NAME.safetensors`` (weights), ``aux_NAME_optimizer.safetensors`` and ``aux_NAME.json``."""
    from safetensors.torch import save

    files = {}
    for name, (module, optimizer) in parts.items():
        tensors, meta = _flat_optimizer(optimizer.state_dict())
        files[f"aux_{name}.safetensors"] = save({k: v.detach().contiguous() for k, v in module.state_dict().items()})
        files[f"aux_{name}_optimizer.safetensors"] = save(tensors)
        files[f"aux_{name}.json"] = json.dumps(meta).encode()
    return files


def load_auxiliary(path: Path, parts: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]) -> None:
    """Restore what :func:`auxiliary_files` wrote, each part checked against its target."""
    for name, (module, optimizer) in parts.items():
        weights = path / f"aux_{name}.safetensors"
        if not weights.is_file():
            raise FileError(f"{path} has no {weights.name}: the objective's {name} network was not saved with it")
        load_state(module, load_tensors(weights, f"the objective's {name} network"), str(weights))
        load_optimizer(optimizer, load_tensors(path / f"aux_{name}_optimizer.safetensors", f"{name} optimizer state"),
                       read_json(path / f"aux_{name}.json", f"{name} optimizer record"), str(weights))
