"""Adapters: small trained modules that change a frozen network through the hook interface.

* :class:`ImagePromptAdapter` — IP-Adapter (Ye et al. 2023): decoupled cross-attention to an image
  embedding beside the text.
"""

from difflab.adapters.image_prompt import ImageEncoder, ImagePromptAdapter, ImagePrompted

__all__ = ["ImageEncoder", "ImagePromptAdapter", "ImagePrompted"]
