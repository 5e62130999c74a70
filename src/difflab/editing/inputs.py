"""The checks every editing method makes of its inputs, and mask feathering."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class EditError(ValueError):
    """An editing input that cannot work: what was wrong and what to do."""


def check_image(image: Tensor, shape: tuple[int, ...] | None = None, what: str = "image") -> Tensor:
    """A batch (N, ...) of images, finite, and of the model's ``shape`` (C, H, W) when given (then a
    single image of that shape gets a batch axis)."""
    if not isinstance(image, Tensor) or not image.is_floating_point():
        raise EditError(f"the {what} must be a float tensor (N, C, H, W) in [-1, 1], got {type(image).__name__}"
                        f"{'' if not isinstance(image, Tensor) else ' of ' + str(image.dtype)}")
    if shape is not None and image.ndim == len(shape):
        image = image[None]
    if image.ndim < 2:
        raise EditError(f"the {what} must be a batch (N, ...), got shape {tuple(image.shape)}")
    if shape is not None and tuple(image.shape[1:]) != tuple(shape):
        channels = f" ({image.shape[1]} channels, the model takes {shape[0]})" if image.shape[1] != shape[0] else ""
        raise EditError(f"the {what} has shape {tuple(image.shape[1:])} but the model works on {tuple(shape)}"
                        f"{channels}; resize or convert it first")
    if not bool(torch.isfinite(image).all()):
        raise EditError(f"the {what} holds NaN or infinite values")
    return image


def check_mask(mask: Tensor, image: Tensor) -> Tensor:
    """A mask (1 = repaint, 0 = keep; soft values blend) of the image's batch and size, shaped
    (N, 1, H, W). A mask with nothing to repaint, or with nothing to keep, is refused."""
    if not isinstance(mask, Tensor):
        raise EditError(f"the mask must be a tensor (N, 1, H, W) or (H, W) with values in [0, 1], got "
                        f"{type(mask).__name__}")
    mask = mask.to(image.dtype)
    while mask.ndim < 4:
        mask = mask[None]
    if mask.shape[-2:] != image.shape[-2:]:
        raise EditError(f"the mask is {tuple(mask.shape[-2:])} pixels but the image is {tuple(image.shape[-2:])}; "
                        "give a mask of the image's size")
    if mask.shape[1] != 1:
        raise EditError(f"the mask must have one channel, got {mask.shape[1]}")
    if mask.shape[0] not in (1, image.shape[0]):
        raise EditError(f"{mask.shape[0]} masks for {image.shape[0]} images; give one mask or one per image")
    if not bool(torch.isfinite(mask).all()) or bool(((mask < 0) | (mask > 1)).any()):
        raise EditError("mask values must lie in [0, 1] (1 = repaint, 0 = keep)")
    per_image = mask.expand(image.shape[0], -1, -1, -1).flatten(1)
    if bool((per_image.amax(1) == 0).any()):
        raise EditError("the mask is empty for some image: nothing would be repainted (1 marks what to repaint)")
    if bool((per_image.amin(1) == 1).any()):
        raise EditError("the mask covers all of some image: nothing is kept, so this is plain sampling; "
                        "sample instead, or mark what to keep with 0")
    return mask.expand(image.shape[0], -1, -1, -1)


def check_strength(strength: float) -> float:
    """SDEdit's strength: the fraction of the noise range the image is pushed back, in (0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise EditError(f"strength must be a number in (0, 1] (1 = start from pure noise), got {strength!r}")
    return float(strength)


def feather(mask: Tensor, radius: float) -> Tensor:
    """The mask blurred outward by a Gaussian of std ``radius`` pixels: it only grows, so every pixel
    the hard mask repaints is still fully repainted, and pixels farther than ~3 radii stay exactly 0."""
    if radius < 0:
        raise EditError(f"the feather radius must be >= 0 pixels, got {radius}")
    if radius == 0:
        return mask
    size = 2 * math.ceil(3 * radius) + 1
    x = torch.arange(size, dtype=mask.dtype, device=mask.device) - size // 2
    kernel = torch.exp(-0.5 * (x / radius) ** 2)
    kernel = kernel / kernel.sum()
    pad = size // 2
    blurred = F.conv2d(F.pad(mask, (pad, pad, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    blurred = F.conv2d(F.pad(blurred, (0, 0, pad, pad), mode="replicate"), kernel.view(1, 1, -1, 1))
    soft = torch.maximum(mask, (2 * blurred).clamp(max=1))
    return torch.where(soft < 1e-6, torch.zeros_like(soft), soft)
