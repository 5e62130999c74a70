"""The network hook interface: how anything outside ``models/`` changes a network's behaviour.

Guidance that perturbs attention (PAG) or reads the label embedding (ICG), adapters (LoRA,
ControlNet residuals, image-prompt attention), accelerators (block caches, token merging, attention
reuse) and editing (prompt-to-prompt) use only this protocol, which every difflab network
implements (:class:`difflab.models.base.Network`):

* **blocks**: ``block_names()`` lists the network's blocks in the order they run, under stable
  names (``"down.0"``, ``"mid"``, ``"up.3"`` for a U-Net; ``"block.0"``.. for a DiT and an MLP).
  ``hook_blocks({name: hook})`` installs, for the duration of a ``with``, a hook
  ``hook(name, compute, inputs) -> output`` around each named block: ``compute()`` runs the block,
  so a hook may observe or change its output, or return a saved one without calling it (a cache).
* **attention**: ``attention_names(kind)`` lists the attention layers (``"self"``, ``"cross"`` or
  ``"all"``) as ``"<block>/<n>"``; ``hook_attention(processor, kind, names)`` swaps their
  processor ``processor(attn, x, context, mask, rope) -> out`` for the ``with``.
* **weight layers**: ``weight_layers()`` names every linear and convolution layer by its module
  path; ``hook_layers({name: hook})`` makes a layer's output ``hook(input, output)`` for the
  ``with`` (LoRA's low-rank updates); ``replace_layers({name: computation})`` makes a layer compute
  ``computation(input)`` instead (int8 inference).
* **residuals**: ``residual_points()`` names where additive residuals may enter (a U-Net's skip
  connections and middle, a DiT's block outputs); ``forward(..., residuals={name: tensor})`` adds
  them (ControlNet).
* **condition embedding**: ``class_embedding_table()`` is the label embedding table (None without
  one) and ``embed_class_labels(labels)`` the embedding a label gets; a network accepts such
  embeddings in place of labels (ICG).

Hooks are installed for one call (context managers) and leave no state behind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch

Tensor = torch.Tensor
#: ``hook(name, compute, inputs)``: ``compute()`` runs the block; return its output or a replacement
BlockHook = Callable[[str, Callable[[], Any], tuple], Any]
#: ``processor(attn, x, context, mask, rope) -> output``; see ``models.layers.Attention``
AttentionProcessor = Callable[..., Tensor]


@runtime_checkable
class Hookable(Protocol):
    """What a network offers to code that changes its behaviour from outside."""

    def block_names(self) -> list[str]: ...

    def hook_blocks(self, hooks: dict[str, BlockHook]) -> AbstractContextManager[None]: ...

    def attention_names(self, kind: str = "all") -> list[str]: ...

    def hook_attention(self, processor: AttentionProcessor, kind: str = "all",
                       names: Sequence[str] | None = None) -> AbstractContextManager[int]: ...

    def named_attention(self, kind: str = "all") -> list[tuple[str, Any]]: ...

    def weight_layers(self) -> dict[str, Any]: ...

    def hook_layers(self, hooks: dict[str, Callable[[Tensor, Tensor], Tensor]]) -> AbstractContextManager[None]: ...

    def replace_layers(self, computations: dict[str, Callable[[Tensor], Tensor]]) -> AbstractContextManager[None]: ...

    def residual_points(self) -> list[str]: ...

    def class_embedding_table(self) -> Tensor | None: ...

    def embed_class_labels(self, labels: Tensor) -> Tensor: ...


def network_of(denoiser: Any) -> Hookable | None:
    """The hookable network behind a denoiser (or a wrapper of one), or None (e.g. an analytic
    model or a plain function)."""
    while denoiser is not None:
        net = getattr(denoiser, "net", None)
        if isinstance(net, Hookable):
            return net
        denoiser = getattr(denoiser, "denoiser", None)
    return None
