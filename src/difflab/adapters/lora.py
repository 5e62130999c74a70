"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen layer ``y = W x`` gains a trained update ``y = W x + scale * (alpha / rank) * B A x`` with
``A`` (rank x in) and ``B`` (out x rank, zero at the start, so training starts from the base model).
Layers are chosen by patterns over the network's weight-layer names (``fnmatch`` style; attention
projections by default); convolutions get a ``rank``-channel convolution of the same kernel followed
by a 1x1 one (what kohya and PEFT do).

At run time the update is added through the network hook interface for the ``with`` (several
LoRAs, each at its own scale, add up); :func:`merge` writes ``sum scale_i * delta W_i`` into the
weights for adapter-free speed and :meth:`Merged.restore` puts back the original weights bit for
bit (they are kept, not recomputed by subtraction). Files: ``lora.safetensors`` (PEFT's
``<layer>.lora_A.weight`` / ``lora_B.weight`` naming over difflab layer names) beside
``lora.json`` with the settings and the base model's identity.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.adapters.files import read_adapter, save_adapter
from difflab.hooks import network_of

Tensor = torch.Tensor
FORMAT = "difflab-lora"
#: attention projections of every attention layer (self and cross)
DEFAULT_TARGETS = ("*.to_q", "*.to_k", "*.to_v", "*.to_out")


class LoRAError(ValueError):
    pass


def _slot(name: str) -> str:
    return name.replace(".", "__")


class LoRA(nn.Module):
    """Low-rank updates for the layers of ``network`` whose names match ``targets``: ``rank``,
    ``alpha`` (default: the rank, so the scaling alpha / rank is 1), ``dropout`` on the update's
    input while training. ``layers`` (exact names) replaces the patterns. ``student``: what a
    distilled LoRA (LCM-LoRA) was trained to sample with, ``{"method", "sampler", "steps"}``, so a
    pipeline sampling it otherwise warns; saved with it."""

    def __init__(self, network: Any, *, rank: int = 4, alpha: float | None = None,
                 targets: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0,
                 layers: Sequence[str] | None = None, alphas: dict[str, float] | None = None,
                 student: dict[str, Any] | None = None):
        super().__init__()
        self.student = dict(student) if student else None
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise LoRAError(f"rank must be a whole number >= 1, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise LoRAError(f"dropout must lie in [0, 1), got {dropout}")
        available = network.weight_layers()
        if layers is None:
            layers = [name for name in available if any(fnmatch(name, p) for p in targets)]
            if not layers:
                raise LoRAError(f"no layer of this {type(network).__name__} matches {list(targets)}; its layers are "
                                f"named like {', '.join(list(available)[:6])} ...")
        unknown = [name for name in layers if name not in available]
        if unknown:
            raise LoRAError(f"this {type(network).__name__} has no layer(s) {', '.join(unknown[:5])}")
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.targets, self.dropout_rate = tuple(targets), float(dropout)
        self.layers = list(layers)
        self.alphas = {name: float(a) for name, a in (alphas or {}).items()}  # per-layer (kohya files)
        self.down, self.up = nn.ModuleDict(), nn.ModuleDict()
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in self.layers:
            layer = available[name]
            self.shapes[name] = tuple(layer.weight.shape)
            if isinstance(layer, nn.Linear):
                down = nn.Linear(layer.in_features, rank, bias=False)
                up = nn.Linear(rank, layer.out_features, bias=False)
            else:
                if layer.groups != 1:
                    raise LoRAError(f"{name} is a grouped convolution; LoRA takes linear and plain convolutions")
                down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                                 layer.dilation, bias=False)
                up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
            device, dtype = layer.weight.device, layer.weight.dtype
            self.down[_slot(name)], self.up[_slot(name)] = down.to(device, dtype), up.to(device, dtype)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def scaling(self, name: str) -> float:
        return self.alphas.get(name, self.alpha) / self.rank

    def settings(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "dropout": self.dropout_rate,
                "layers": self.layers, "alphas": self.alphas, **({"student": self.student} if self.student else {})}

    # --- at run time ----------------------------------------------------------------------------------
    def update(self, name: str, x: Tensor) -> Tensor:
        """``(alpha / rank) B A x`` of layer ``name`` for its input ``x``."""
        slot = _slot(name)
        return self.up[slot](self.down[slot](self.drop(x))) * self.scaling(name)

    def hooks(self, scale: float = 1.0) -> dict[str, Any]:
        """``{layer: hook(input, output)}`` adding ``scale`` times the update, for ``hook_layers``."""
        return {name: (lambda x, out, name=name: out + scale * self.update(name, x)) for name in self.layers}

    def check_fits(self, network: Any) -> None:
        """Refuse a network whose layers this LoRA does not fit, naming them (nothing is installed)."""
        available = network.weight_layers()
        missing = [n for n in self.layers if n not in available]
        wrong = [f"{n} {tuple(available[n].weight.shape)} (LoRA made for {self.shapes[n]})"
                 for n in self.layers if n in available and tuple(available[n].weight.shape) != self.shapes[n]]
        if missing or wrong:
            raise LoRAError(f"this LoRA does not fit the network: missing layers {missing[:5]}; other shapes "
                            f"{wrong[:3]}")

    def weight_delta(self, name: str) -> Tensor:
        """``(alpha / rank) B A`` as a weight of layer ``name``'s shape."""
        slot = _slot(name)
        a, b = self.down[slot].weight, self.up[slot].weight
        if a.ndim == 2:
            delta = b @ a
        else:  # conv: (out, rank, 1, 1) after (rank, in, k, k)
            delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        return delta * self.scaling(name)

    # --- files ----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, base_identity: str = "") -> Path:
        """``lora.safetensors`` + ``lora.json`` (settings, base model identity), each written atomically."""
        tensors = {}
        for name in self.layers:
            tensors[f"{name}.lora_A.weight"] = self.down[_slot(name)].weight
            tensors[f"{name}.lora_B.weight"] = self.up[_slot(name)].weight
        return save_adapter(directory, "lora", FORMAT, tensors, self.settings(), base_identity)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, network: Any, *, base_identity: str | None = None,
                        allow_other_base: bool = False) -> LoRA:
        """Load a saved LoRA onto ``network``. One made for another base (its identity differs from
        ``base_identity``) is refused unless ``allow_other_base``; one whose layers the network lacks
        is refused with their names. Nothing is loaded half-way."""
        meta, tensors = read_adapter(directory, "lora", FORMAT, "LoRA", LoRAError, base_identity=base_identity,
                                     allow_other_base=allow_other_base,
                                     hint="; PEFT, diffusers and kohya files load with difflab.interop.lora_from_file")
        order = {name: i for i, name in enumerate(meta.get("layers", []))}  # the file's keys are sorted
        tensors = dict(sorted(tensors.items(), key=lambda kv: order.get(kv[0].rsplit(".", 2)[0], len(order))))
        lora = cls.from_tensors(network, tensors, rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                                targets=meta.get("targets", DEFAULT_TARGETS), alphas=meta.get("alphas") or {})
        lora.student = meta.get("student") or None
        return lora

    @classmethod
    def from_tensors(cls, network: Any, tensors: dict[str, Tensor], *, rank: int | None = None,
                     alpha: float | None = None, targets: Sequence[str] = (), alphas: dict[str, float] | None = None,
                     names: dict[str, str] | None = None) -> LoRA:
        """A LoRA from ``{"<layer>.lora_A.weight": A, "<layer>.lora_B.weight": B}``; ``names`` maps
        the file's layer names to this network's (files of other libraries, see interop). Keys that
        match no layer are listed in the error; nothing is loaded half-way."""
        pairs: dict[str, dict[str, Tensor]] = {}
        stray = []
        for key, value in tensors.items():
            for part in ("lora_A", "lora_B"):
                if key.endswith(f".{part}.weight"):
                    pairs.setdefault(key[: -len(f".{part}.weight")], {})[part] = value
                    break
            else:
                stray.append(key)
        names = names or {}
        layers = network.weight_layers()
        mapped = {src: names.get(src, src) for src in pairs}
        unmatched = sorted(src for src, dst in mapped.items() if dst not in layers)
        incomplete = sorted(src for src, pair in pairs.items() if len(pair) != 2)
        if stray or unmatched or incomplete or not pairs:
            raise LoRAError(f"the LoRA weights do not fit this {type(network).__name__}: "
                            f"{len(pairs) - len(unmatched)} of {len(pairs)} layers match; unmatched "
                            f"{unmatched[:8]}{' ...' if len(unmatched) > 8 else ''}; without both A and B "
                            f"{incomplete[:4]}; keys that are not LoRA weights {stray[:4]}")
        ranks = {int(pair["lora_A"].shape[0]) for pair in pairs.values()}
        if len(ranks) != 1 or (rank is not None and ranks != {rank}):
            raise LoRAError(f"the LoRA's layers have ranks {sorted(ranks)}; difflab's LoRA has one rank "
                            f"{'(the config says ' + str(rank) + ')' if rank is not None else ''}")
        rank = ranks.pop()
        alphas = {mapped.get(k, k): v for k, v in (alphas or {}).items()}
        lora = cls(network, rank=rank, alpha=alpha, targets=targets or DEFAULT_TARGETS, layers=list(mapped.values()),
                   alphas=alphas)
        state = {}
        for src, dst in mapped.items():
            for part, module in (("lora_A", lora.down), ("lora_B", lora.up)):
                want = module[_slot(dst)].weight
                value = pairs[src][part]
                if value.ndim == 2 and want.ndim == 4:  # a linear-shaped update of a 1x1 convolution
                    value = value[:, :, None, None]
                if tuple(value.shape) != tuple(want.shape):
                    raise LoRAError(f"{src}.{part}: shape {tuple(value.shape)} does not fit layer {dst} "
                                    f"(needs {tuple(want.shape)})")
                state[f"{'down' if part == 'lora_A' else 'up'}.{_slot(dst)}.weight"] = value
        lora.load_state_dict(state)
        return lora


def _as_list(loras: LoRA | Sequence[tuple[LoRA, float]] | Sequence[LoRA]) -> list[tuple[LoRA, float]]:
    if isinstance(loras, LoRA):
        return [(loras, 1.0)]
    return [item if isinstance(item, tuple) else (item, 1.0) for item in loras]


@contextlib.contextmanager
def applied(network: Any, loras: LoRA | Sequence[tuple[LoRA, float]] | Sequence[LoRA]) -> Iterator[None]:
    """Run ``network`` with the LoRAs' updates (each ``(lora, scale)``) added, for the ``with``."""
    items = _as_list(loras)
    for lora, _ in items:
        lora.check_fits(network)
    with _installed(network, items):
        yield


@contextlib.contextmanager
def _installed(network: Any, items: list[tuple[LoRA, float]]) -> Iterator[None]:
    """The LoRAs' hooks, already checked to fit (a sampling step should not walk the layers again)."""
    with contextlib.ExitStack() as stack:
        for lora, scale in items:
            if scale != 0:
                stack.enter_context(network.hook_layers(lora.hooks(float(scale))))
        yield


class Merged:
    """Weights with LoRA updates written in; :meth:`restore` puts the originals back bit for bit."""

    def __init__(self, network: Any, originals: dict[str, Tensor]):
        self.network, self.originals = network, originals

    @torch.no_grad()
    def restore(self) -> None:
        layers = self.network.weight_layers()
        for name, weight in self.originals.items():
            layers[name].weight.copy_(weight)
        self.originals = {}

    def __enter__(self) -> Merged:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


@torch.no_grad()
def merge(network: Any, loras: LoRA | Sequence[tuple[LoRA, float]] | Sequence[LoRA]) -> Merged:
    """Write ``W + sum_i scale_i * delta W_i`` into the layers (one rounding per weight) and keep the
    originals; use as ``with merge(net, [(a, 1.0), (b, 0.5)]):`` or call ``.restore()``."""
    items = _as_list(loras)
    for lora, _ in items:
        lora.check_fits(network)
    layers = network.weight_layers()
    names = sorted({name for lora, _ in items for name in lora.layers})
    originals = {name: layers[name].weight.detach().clone() for name in names}
    for name in names:
        weight = layers[name].weight
        total = sum(scale * lora.weight_delta(name).to(torch.float64) for lora, scale in items if name in lora.layers)
        weight.copy_((weight.to(torch.float64) + total).to(weight.dtype))
    return Merged(network, originals)


class WithLoRA(nn.Module):
    """A denoiser whose network runs with LoRAs (``[(lora, scale), ...]``) on every call: wrap the
    plain denoiser, under guidance, so both branches see them."""

    def __init__(self, denoiser: Any, loras: LoRA | Sequence[tuple[LoRA, float]] | Sequence[LoRA]):
        super().__init__()
        network = network_of(denoiser)
        if network is None:
            raise LoRAError("a LoRA needs a denoiser over a difflab network")
        self.denoiser, self.process, self.network = denoiser, denoiser.process, network
        self.loras = _as_list(loras)
        for lora, _ in self.loras:
            lora.check_fits(network)

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        with _installed(self.network, self.loras):  # checked once, in __init__
            return self.denoiser(x, t, **cond)
