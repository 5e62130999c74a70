"""Adapters: small trained modules that change a frozen network through the hook interface.

* :class:`LoRA` — low-rank updates of chosen layers (Hu et al. 2021): at run time (several at once,
  each with its scale) or merged into the weights and restored bit for bit.
* :class:`ControlNet` — a trainable copy of a U-Net's encoder feeding zero-initialised residuals
  into the frozen one (Zhang et al. 2023); :class:`Controlled` applies one or several.
* :class:`ImagePromptAdapter` — IP-Adapter (Ye et al. 2023): decoupled cross-attention to an image
  embedding beside the text.
"""

from difflab.adapters.controlnet import Control, ControlError, Controlled, ControlNet, HintEncoder
from difflab.adapters.image_prompt import ImageEncoder, ImagePromptAdapter, ImagePrompted
from difflab.adapters.lora import LoRA, LoRAError, Merged, WithLoRA, applied, merge

__all__ = ["Control", "ControlError", "ControlNet", "Controlled", "HintEncoder", "ImageEncoder",
           "ImagePromptAdapter", "ImagePrompted", "LoRA", "LoRAError", "Merged", "WithLoRA", "applied", "merge"]
