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
from safetensors.torch import load_file, save_file


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


def save(out_dir: Path, step: int, *, model: torch.nn.Module, ema: torch.nn.Module | None,
         optimizer: torch.optim.Optimizer, scheduler: Any, config: dict, keep_last: int = 2,
         extra: dict | None = None) -> Path:
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    if ema is not None:
        save_file({k: v.detach().contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    opt_tensors, opt_meta = _flat_optimizer(optimizer.state_dict())
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    trainer = {"step": step, "config": config, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
               "cpu_rng": torch.get_rng_state().tolist(), **(extra or {})}
    (tmp / "trainer.json").write_text(json.dumps(trainer))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out_dir: Path) -> Path | None:
    found = sorted(p for p in (Path(out_dir) / "checkpoints").glob("step_*") if (p / "trainer.json").is_file())
    return found[-1] if found else None


def load_weights(path: Path, *, model: torch.nn.Module, ema: torch.nn.Module | None) -> None:
    """The model's (checked against its config) and, when saved, the EMA's weights of a checkpoint."""
    from difflab.models.base import load_checked

    load_checked(model, load_file(path / "model.safetensors"), str(path))
    if ema is not None and (path / "ema.safetensors").is_file():
        ema.load_state_dict(load_file(path / "ema.safetensors"))


def load(path: Path, *, model: torch.nn.Module, ema: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
         scheduler: Any) -> dict:
    """Everything a resumed run needs: weights, optimizer, LR schedule and the CPU RNG."""
    trainer = json.loads((path / "trainer.json").read_text())
    load_weights(path, model=model, ema=ema)
    optimizer.load_state_dict(_unflat_optimizer(load_file(path / "optimizer.safetensors"), trainer["optimizer"]))
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(torch.tensor(trainer["cpu_rng"], dtype=torch.uint8))
    return trainer
