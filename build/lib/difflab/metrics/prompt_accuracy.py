"""Prompt faithfulness on the shapes data, in the spirit of GenEval (Ghosh et al. 2023): does each
generated image show the shape, colour, size and position its prompt asked for? Scored by difflab's
shapes attribute classifier, so it needs no downloaded model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from difflab.data.shapes import attribute_indices, parse_caption
from difflab.metrics.classifiers import attribute_hits, load_classifier

ATTRIBUTES = ("shape", "colour", "size", "position")


def prompt_accuracy(images: torch.Tensor, prompts: Sequence[str], *,
                    groups: dict[str, Sequence[bool]] | None = None) -> dict[str, Any]:
    """Fraction of images with every attribute right (``accuracy``) and per attribute; with
    ``groups`` (name -> one boolean per image, e.g. prompts unseen in training) also per group."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts; give one prompt per image")
    wanted = torch.tensor([attribute_indices(parse_caption(p)) for p in prompts])
    model, held_out = load_classifier("shapes")
    hits = attribute_hits(model, images.float().cpu(), wanted)

    def summary(mask: torch.Tensor) -> dict[str, Any]:
        h = hits[mask]
        return {"accuracy": float(h.all(1).float().mean()), "n": int(mask.sum()),
                **{name: float(h[:, i].float().mean()) for i, name in enumerate(ATTRIBUTES)}}

    out = {**summary(torch.ones(len(prompts), dtype=torch.bool)), "classifier_accuracy_on_real": held_out}
    for name, mask in (groups or {}).items():
        out[name] = summary(torch.as_tensor(list(mask), dtype=torch.bool))
    return out
