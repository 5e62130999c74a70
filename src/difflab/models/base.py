"""What every difflab network shares: a config dataclass, a JSON round trip, a parameter count."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from difflab.checks import describe, fits
from difflab.files import FileError, load_state, load_tensors, read_json, save_tensors, write_json
from difflab.models.layers import Attention, attention_layers, attention_processor

Tensor = torch.Tensor
#: the scalar conditions a network may embed: (forward keyword, config flag, attribute, default value)
SCALAR_CONDITIONS = (("step_size", "step_size_embedding", "step_embed", 0.0),
                     ("guidance_scale", "guidance_embedding", "guidance_embed", 1.0))
#: modules whose output starts at zero (the scalar embedders), so weights without them give the same network
ZERO_START_MODULES = tuple(f"{attribute}." for _, _, attribute, _ in SCALAR_CONDITIONS)


class Network(nn.Module):
    """Base class of difflab's networks; subclasses set ``config_class`` and ``kind``."""

    config_class: ClassVar[type]
    kind: ClassVar[str]

    def __init__(self, config: Any):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @classmethod
    def from_config(cls, config: dict[str, Any] | Any) -> Network:
        """Build from a config dataclass or its dict (unknown keys are refused by name)."""
        if isinstance(config, cls.config_class):
            return cls(config)
        config = {k: v for k, v in dict(config).items() if k != "kind"}
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"{cls.__name__} config has unknown field(s) {', '.join(unknown)}; "
                             f"valid fields: {', '.join(sorted(fields))}")
        hints = typing.get_type_hints(cls.config_class)
        for key, value in config.items():
            if isinstance(value, list):  # JSON turns tuples into lists
                value = config[key] = tuple(value)
            if not fits(value, hints[key]):
                raise ValueError(f"{cls.__name__} config: {key} must be {describe(hints[key])}, got {value!r}")
        return cls(cls.config_class(**config))

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self.config)}

    def scalar_embedders(self, width: int, frequency_dim: int) -> None:
        """Build the :class:`~difflab.models.layers.ScalarEmbedder` of each scalar condition its
        config asks for (``step_size_embedding``, ``guidance_embedding``)."""
        from difflab.models.layers import ScalarEmbedder

        for _, flag, attribute, default in SCALAR_CONDITIONS:
            wanted = getattr(self.config, flag, False)
            setattr(self, attribute, ScalarEmbedder(width, frequency_dim, default=default) if wanted else None)

    def add_scalar_conditions(self, emb: Tensor, like: Tensor, **values: Tensor | None) -> Tensor:
        """``emb`` plus the embedding of each scalar condition (step_size=, guidance_scale=); a value
        the network was not built for is refused."""
        for keyword, flag, attribute, _ in SCALAR_CONDITIONS:
            embedder, value = getattr(self, attribute, None), values.get(keyword)
            if embedder is not None:
                emb = emb + embedder(value, like).to(emb.dtype)
            elif value is not None:
                raise ValueError(f"this {type(self).__name__} takes no {keyword}; build it with {flag}=True")
        return emb

    # --- the hook interface (difflab.hooks.Hookable) ----------------------------------------------
    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """The blocks in the order they run, under stable names; subclasses define them."""
        return []

    def block_names(self) -> list[str]:
        return [name for name, _ in self.named_blocks()]

    def run_block(self, name: str, compute: Callable[..., Any], *inputs: Any) -> Any:
        """Run block ``name`` as ``compute(*inputs)``, through its hook when one is installed."""
        hook = self.__dict__.get("_block_hooks", {}).get(name)
        if hook is None:
            return compute(*inputs)
        return hook(name, lambda: compute(*inputs), inputs)

    @contextmanager
    def hook_blocks(self, hooks: dict[str, Callable]) -> Iterator[None]:
        """Install ``{block name: hook(name, compute, inputs)}`` for the ``with``; see difflab.hooks."""
        names = self.block_names()
        unknown = sorted(set(hooks) - set(names))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no block(s) {', '.join(unknown)}; its blocks are: "
                             f"{', '.join(names) or 'none'}")
        saved = self.__dict__.get("_block_hooks", {})
        if set(saved) & set(hooks):
            raise ValueError(f"block(s) {', '.join(sorted(set(saved) & set(hooks)))} already have a hook installed")
        self.__dict__["_block_hooks"] = {**saved, **hooks}
        try:
            yield
        finally:
            self.__dict__["_block_hooks"] = saved

    def named_attention(self, kind: str = "all") -> list[tuple[str, Attention]]:
        """``("<block>/<n>", layer)`` for each attention layer of ``kind`` (self, cross, all), in order."""
        if kind not in ("all", "self", "cross"):
            raise ValueError(f"attention kind must be 'all', 'self' or 'cross', got {kind!r}")
        out = []
        for block, module in self.named_blocks():
            for i, layer in enumerate(attention_layers(module, "all")):
                if kind == "all" or (kind == "cross") == layer.is_cross:
                    out.append((f"{block}/{i}", layer))
        return out

    def attention_names(self, kind: str = "all") -> list[str]:
        return [name for name, _ in self.named_attention(kind)]

    @contextmanager
    def hook_attention(self, processor: Callable[..., torch.Tensor], kind: str = "all",
                       names: Sequence[str] | None = None) -> Iterator[int]:
        """Swap the processor of the attention layers of ``kind`` (only ``names`` when given) for the
        ``with``; yields how many layers were hooked."""
        layers = dict(self.named_attention(kind))
        if names is not None:
            unknown = sorted(set(names) - set(layers))
            if unknown:
                raise ValueError(f"no {kind} attention layer(s) {', '.join(unknown)}; this network's are: "
                                 f"{', '.join(layers) or 'none'}")
            layers = {n: layers[n] for n in names}
        if not layers:
            raise ValueError(f"{type(self).__name__} has no {kind} attention layers to hook")
        chosen = {id(layer) for layer in layers.values()}
        with attention_processor(self, processor, kind, where=lambda a: id(a) in chosen) as count:
            yield count

    def weight_layers(self) -> dict[str, nn.Linear | nn.Conv2d]:
        """Every linear and 2-D convolution layer under its module name (``"down.1.1.blocks.0.attn.to_q"``):
        what low-rank adapters (LoRA) update and merge into."""
        return {name: m for name, m in self.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}

    @contextmanager
    def hook_layers(self, hooks: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """For the ``with``, layer ``name``'s output becomes ``hook(input, output)`` (``{name: hook}``
        over :meth:`weight_layers`); hooks of several ``with`` blocks on one layer apply in turn."""
        layers = self.weight_layers()
        unknown = sorted(set(hooks) - set(layers))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no linear or convolution layer(s) "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        handles = [layers[name].register_forward_hook(lambda _m, args, out, fn=fn: fn(args[0], out))
                   for name, fn in hooks.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def replace_layers(self, computations: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """For the ``with``, layer ``name`` computes ``computation(input)`` instead of its own forward
        (``{name: computation}`` over :meth:`weight_layers`): what int8 inference runs in its place."""
        layers = self.weight_layers()
        unknown = sorted(set(computations) - set(layers))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no linear or convolution layer(s) "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        replaced = [name for name in computations if "forward" in vars(layers[name])]
        if replaced:
            raise ValueError(f"layer(s) {', '.join(replaced[:5])} are replaced already (nested replace_layers)")
        for name, fn in computations.items():
            layers[name].forward = fn  # the instance attribute shadows the class's forward; hooks still run
        try:
            yield
        finally:
            for name in computations:
                del layers[name].forward

    def residual_points(self) -> list[str]:
        """Where ``forward(..., residuals={name: tensor})`` may add residuals; subclasses define them."""
        return []

    def check_residuals(self, residuals: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if not residuals:  # the common case: nothing to check on every forward
            return {}
        residuals = dict(residuals)
        unknown = sorted(set(residuals) - set(self.residual_points()))
        if unknown:
            raise ValueError(f"{type(self).__name__} takes no residual(s) at {', '.join(unknown)}; its residual "
                             f"points are: {', '.join(self.residual_points()) or 'none'}")
        return residuals

    def class_embedding_table(self) -> torch.Tensor | None:
        """The label embedding table, (classes + 1) x width with the null class last, or None."""
        embedder = getattr(self, "label_embed", None)
        return None if embedder is None else embedder.table.weight

    def embed_class_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The embedding the network gives ``labels`` (-1: the null class); it accepts these in place
        of labels."""
        embedder = getattr(self, "label_embed", None)
        if embedder is None:
            raise ValueError(f"this {type(self).__name__} is not class-conditional: it has no label embedding")
        return embedder(labels)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def load_widened(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load weights of a network that differs only by having fewer input channels in some layers
        (an inpainting model made from a trained one, Rombach et al. 2022): those weights fill the
        leading input channels and the new ones are zero, so the network computes what the original
        did whatever the new inputs are. Returns the widened weights' names; anything else that does
        not fit is refused. Embeddings that start at zero (a shortcut model's step size) may be missing
        from the weights: they keep their initialisation, which adds nothing."""
        own, widened = self.state_dict(), []
        added = sorted(k for k in set(own) - set(state) if k.startswith(ZERO_START_MODULES))
        missing, unexpected = sorted(set(own) - set(state) - set(added)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"the weights do not fit this {type(self).__name__}: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        fitted = {}
        for key, value in state.items():
            target = own[key]
            if value.shape == target.shape:
                fitted[key] = value
                continue
            if value.ndim < 2 or value.shape[0] != target.shape[0] or value.shape[2:] != target.shape[2:] \
                    or value.shape[1] > target.shape[1]:
                raise ValueError(f"{key}: the weights' shape {tuple(value.shape)} cannot be widened to "
                                 f"{tuple(target.shape)} (only input channels may be added)")
            wide = torch.zeros_like(target)
            wide[:, : value.shape[1]] = value
            fitted[key] = wide
            widened.append(key)
        fitted.update({key: own[key] for key in added})
        self.load_state_dict(fitted)
        return widened

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (each atomically: temporary file, rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / "config.json", self.to_config())
        save_tensors(directory / "model.safetensors", self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Network:
        """Rebuild from :meth:`save_pretrained`; weights that do not fit the config are named."""
        directory = Path(directory)
        if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
            raise FileNotFoundError(f"{directory} holds no saved network (config.json and model.safetensors)")
        config = read_json(directory / "config.json", "network config")
        if not isinstance(config, dict):
            raise FileError(f"{directory / 'config.json'} is not a network config (a JSON object with 'kind')")
        if cls is not Network and config.get("kind") != cls.kind:
            raise ValueError(f"{directory} holds a {config.get('kind')!r} network, not a {cls.kind!r}")
        from difflab.models import from_config

        try:
            net = from_config(config)
        except (TypeError, ValueError) as err:
            raise FileError(f"{directory / 'config.json'}: {err}") from None
        load_state(net, load_tensors(directory / "model.safetensors", "network weights"), str(directory))
        return net


def check_image(owner: str, x: torch.Tensor, channels: int, multiple: int, unit: str) -> None:
    """Refuse an input that is not (batch, channels, H, W) with H and W divisible by ``multiple``."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{owner} expects (batch, {channels}, H, W), got {tuple(x.shape)}")
    if x.shape[-1] % multiple or x.shape[-2] % multiple:
        raise ValueError(f"{owner}: spatial size {tuple(x.shape[-2:])} is not divisible by {unit} {multiple}")


def check_conditioning(owner: str, config: Any, class_labels: Any, context: Any = None) -> None:
    """Refuse a call that leaves out the conditioning the network was built for."""
    if getattr(config, "num_classes", None) and class_labels is None:
        raise ValueError(f"this {owner} is class-conditional: pass class_labels (-1 selects the null class)")
    if getattr(config, "context_dim", None) and context is None:
        raise ValueError(f"this {owner} cross-attends to text: pass context (the null prompt's embedding for "
                         "the unconditional branch)")
