"""Where and how training runs: device, processes (DDP), threads and mixed precision, in one place."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from difflab.training.config import ConfigError


@dataclass
class Runtime:
    """The device, this process's rank among ``world``, and the autocast dtype (None: float32)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as the loss sees it: wrapped for gradient averaging when there are several ranks."""
        if self.world == 1:
            return model
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        return nn.parallel.DistributedDataParallel(model)

    def finish(self) -> None:
        """End a distributed run cleanly: wait for every rank (the main one writes the final pipeline),
        then close the process group, so no rank exits while another still uses it."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            # Keep the barrier's work object alive past the teardown: otherwise gloo's worker thread
            # may drop the last reference and destroy it (taking the GIL) while this thread, holding
            # the GIL, joins that worker in the process group's destructor when DDP's reducer goes:
            # a deadlock seen under load (torch 2.13, gloo).
            self._barrier = dist.barrier(async_op=True)
            self._barrier.wait()
            dist.destroy_process_group()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


def setup(train: dict) -> Runtime:
    """The runtime of a ``[train]`` config section under the environment ``torchrun`` sets
    (RANK, WORLD_SIZE, LOCAL_RANK)."""
    threads = int(train["num_threads"])
    if threads > 0:
        torch.set_num_threads(threads)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    mp = train["mixed_precision"]
    if mp not in ("no", "bf16", "fp16"):
        raise ConfigError(f"train.mixed_precision must be 'no', 'bf16' or 'fp16', got {mp!r}")
    if mp != "no" and device.type != "cuda":
        warnings.warn("mixed precision is for CUDA; training in float32 on the CPU", stacklevel=3)
        mp = "no"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    return Runtime(device, rank, world, dtype, torch.amp.GradScaler("cuda") if mp == "fp16" else None)
