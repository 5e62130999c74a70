"""What a caller attaches to the training loop to watch it: each takes the loop's records
(``{"step", "loss", "grad_norm", "lr", "seconds"}``, one per optimizer step) and decides what to keep.
The loop itself writes nothing but checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Record = dict[str, Any]


class JsonLines:
    """Every ``every``-th record (and the last) appended to ``path`` as one JSON line."""

    def __init__(self, path: Path, every: int, total: int):
        self.file, self.every, self.total = open(path, "a"), every, total

    def __call__(self, record: Record) -> None:
        if record["step"] % self.every == 0 or record["step"] == self.total:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoard:
    """loss, grad_norm and lr as TensorBoard scalars; nothing when ``tensorboard`` is not installed."""

    def __init__(self, directory: Path, every: int, total: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(directory))
        self.every, self.total = every, total

    def __call__(self, record: Record) -> None:
        if self.writer is not None and (record["step"] % self.every == 0 or record["step"] == self.total):
            for key in ("loss", "grad_norm", "lr"):
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ProgressBar:
    """A tqdm bar over the steps, showing the loss of every ``every``-th step."""

    def __init__(self, start: int, total: int, every: int, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(initial=start, total=total, disable=not enabled, desc="train", dynamic_ncols=True)
        self.every = every

    def __call__(self, record: Record) -> None:
        self.bar.update()
        if record["step"] % self.every == 0:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}")

    def close(self) -> None:
        self.bar.close()


class Every:
    """Call ``action(step)`` on every ``every``-th step (e.g. a preview grid of samples)."""

    def __init__(self, every: int, action: Callable[[int], Any]):
        self.every, self.action = every, action

    def __call__(self, record: Record) -> None:
        if self.every and record["step"] % self.every == 0:
            self.action(record["step"])

    def close(self) -> None:
        pass
