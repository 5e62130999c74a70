"""Editing: start from an image you have.

* :func:`img2img` — SDEdit (Meng et al. 2022): noise the image to a strength's t, sample from there.
* :func:`inpaint` — repaint a masked region with any sampler (the known region is exact), with
  RePaint's resampling as an option (Lugmayr et al. 2022).
* :func:`invert` — deterministic inversion with any deterministic sampler run from t = 0 up (DDIM
  inversion, Song et al. 2021, and its higher-order counterparts), optionally refined by fixed-point
  iteration; :class:`EDICT` and :class:`BDIA` invert exactly; :func:`null_text_inversion` makes a
  guided run reconstruct the image (Mokady et al. 2023).
* :class:`PromptToPrompt` — cross-attention control for prompt edits (Hertz et al. 2022).
* :class:`ConsistentSelfAttention` — a batch of images that share what they draw (StoryDiffusion,
  Zhou et al. 2024).

Every function takes a denoiser (guided or not, any process and prediction) and works on the
sampler's state space: pixels, or latents of a latent pipeline (:meth:`Pipeline.edit` encodes and
decodes).
"""

from difflab.editing.attention import ConsistentSelfAttention, PromptToPrompt, align_tokens
from difflab.editing.exact import BDIA, EDICT, ExactInversion
from difflab.editing.img2img import img2img
from difflab.editing.inpaint import Inpainting, inpaint
from difflab.editing.inputs import EditError, check_image, check_mask, check_strength, feather
from difflab.editing.inversion import Inversion, NullTextInversion, invert, null_text_inversion

__all__ = ["BDIA", "EDICT", "ConsistentSelfAttention", "EditError", "ExactInversion", "Inpainting", "Inversion",
           "NullTextInversion", "PromptToPrompt", "align_tokens", "check_image", "check_mask", "check_strength",
           "feather", "img2img", "inpaint", "invert", "null_text_inversion"]
