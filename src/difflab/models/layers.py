"""Layers shared by difflab's networks: time and condition embeddings, norms, attention with one
hook point, 2-D rotary position embedding."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


# --- time and condition embeddings ---------------------------------------------------------------
def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0, *, cos_first: bool = True,
                         freq_shift: float = 0.0) -> Tensor:
    """Transformer sinusoidal embedding of a (fractional) time, as in DDPM/ADM: [cos, sin]
    (``cos_first=False``: [sin, cos]); frequencies ``max_period^(-k / (dim/2 - freq_shift))``
    (diffusers' ``flip_sin_to_cos`` and ``downscale_freq_shift``)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    pair = [torch.cos(args), torch.sin(args)]
    emb = torch.cat(pair if cos_first else pair[::-1], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class FourierFeatures(nn.Module):
    """Random Fourier features of the time (Tancik et al. 2020; used by NCSN++ and EDM)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, t: Tensor) -> Tensor:
        args = 2 * math.pi * t.float()[:, None] * self.freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal (or Fourier) features of the model time followed by a two-layer MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256, kind: str = "sinusoidal", *, cos_first: bool = True,
                 freq_shift: float = 0.0):
        super().__init__()
        self.cos_first, self.freq_shift = cos_first, freq_shift
        if kind not in ("sinusoidal", "fourier"):
            raise ValueError(f"time embedding must be 'sinusoidal' or 'fourier', got {kind!r}")
        self.frequency_dim = frequency_dim
        self.fourier = FourierFeatures(frequency_dim) if kind == "fourier" else None
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor, extra: Tensor | None = None) -> Tensor:
        """The embedding of ``t``; ``extra`` is added to its features before the MLP."""
        feats = self.fourier(t) if self.fourier is not None else sinusoidal_embedding(
            t, self.frequency_dim, cos_first=self.cos_first, freq_shift=self.freq_shift)
        if extra is not None:
            feats = feats + extra
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def guidance_features(scale: Tensor | float | None, like: Tensor, dim: int) -> Tensor:
    """A latent consistency model's guidance-scale features (Luo et al. 2023): ``w = scale - 1``
    (no guidance at scale 1, the default) as ``[sin, cos]`` of ``1000 w`` with frequencies over
    ``dim/2 - 1``, one row per sample of ``like``."""
    scale = 1.0 if scale is None else scale
    w = torch.as_tensor(scale, device=like.device, dtype=torch.float32).reshape(-1).expand(like.shape[0])
    return sinusoidal_embedding(1000.0 * (w - 1), dim, cos_first=False, freq_shift=1.0)


class ScalarEmbedder(nn.Module):
    """One number per sample embedded like the time (``scale * value``) and added to the time
    embedding: a shortcut model's step size (Frans et al. 2024) or a latent consistency model's
    guidance scale (Luo et al. 2023). Its output layer starts at zero, so a network widened with it
    equals the network it came from; ``default`` is used when no value is given."""

    def __init__(self, dim: int, frequency_dim: int = 256, scale: float = 1000.0, default: float = 0.0):
        super().__init__()
        self.scale, self.default = scale, default
        self.embed = TimestepEmbedder(dim, frequency_dim)
        zero_(self.embed.mlp[-1])

    def forward(self, value: Tensor | float | None, like: Tensor) -> Tensor:
        value = self.default if value is None else value
        value = torch.as_tensor(value, device=like.device, dtype=torch.float32).reshape(-1).expand(like.shape[0])
        return self.embed(value * self.scale)


class LabelEmbedder(nn.Module):
    """Class-label embedding with one extra "null" class for classifier-free guidance.

    Labels equal to ``num_classes`` (or ``-1``) select the null embedding. A floating-point
    (batch, dim) tensor is taken as the embedding itself (independent condition guidance feeds
    random embeddings this way).
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        if labels.is_floating_point():
            if labels.shape[-1] != self.table.embedding_dim or labels.ndim != 2:
                raise ValueError(f"a class embedding given directly must be (batch, {self.table.embedding_dim}), "
                                 f"got {tuple(labels.shape)}")
            return labels
        labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        if not torch.compiler.is_compiling() and bool((labels > self.num_classes).any()):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}) or be the null class "
                             f"{self.num_classes} / -1")
        return self.table(labels)


class PooledEmbedder(nn.Module):
    """Projection of a pooled text (or image) embedding into the time-embedding space."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.proj(pooled)


# --- norms ---------------------------------------------------------------------------------------
class _Float32Norm:
    """Mixin: with ``fp32=True`` the norm computes in float32 under reduced precision (Hunyuan-DiT
    found it necessary in fp16)."""

    fp32: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if self.fp32 and x.dtype in (torch.float16, torch.bfloat16):
            return super().forward(x.float()).to(x.dtype)
        return super().forward(x)


class GroupNorm(_Float32Norm, nn.GroupNorm):
    """GroupNorm (groups reduced to a divisor of the channels) with the float32 option."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, fp32: bool = False):
        super().__init__(math.gcd(num_groups, num_channels), num_channels, eps=eps)
        self.fp32 = fp32


class LayerNorm(_Float32Norm, nn.LayerNorm):
    """LayerNorm with the float32 option."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True, fp32: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=affine)
        self.fp32 = fp32


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        out = out.to(x.dtype)
        return out * self.weight if self.weight is not None else out


# --- rotary position embedding ---------------------------------------------------------------------
def rope_2d(height: int, width: int, head_dim: int, *, theta: float = 10000.0,
            device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin tables (tokens, head_dim) of axial 2-D RoPE (Su et al. 2021; as in Lumina/FLUX):
    half of each head rotates with the row, half with the column."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    angles = torch.cat([ys.flatten()[:, None] * freqs, xs.flatten()[:, None] * freqs], dim=-1)
    angles = angles.repeat_interleave(2, dim=-1)  # pairs (2i, 2i+1) share an angle
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of ``x`` (batch, heads, tokens, head_dim)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


# --- attention with one hook point -------------------------------------------------------------------
AttentionProcessor = Callable[..., Tensor]


class Attention(nn.Module):
    """Multi-head self- or cross-attention over tokens (batch, tokens, dim).

    The computation runs through ``self.processor(attn, x, context, mask, rope)``: the single hook
    point through which guidance (PAG), caches, token merging and adapters change or observe
    attention without editing networks. :func:`default_processor` is the plain computation;
    processors may call :meth:`qkv`, :meth:`attend` and :meth:`out` to reuse its parts.
    """

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, qk_norm: bool = False,
                 bias: bool = True, name: str = ""):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.is_cross = context_dim is not None
        kv_dim = context_dim if context_dim is not None else dim
        # separate projections: on CPU a fused qkv matrix was 8 % slower in training (the
        # backward of its split concatenates non-contiguous gradients)
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=bias)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(self.head_dim) if qk_norm else None
        self.norm_k = RMSNorm(self.head_dim) if qk_norm else None
        self.processor: AttentionProcessor = default_processor
        self.name = name

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def qkv(self, x: Tensor, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None
            ) -> tuple[Tensor, Tensor, Tensor]:
        """Projected, normalised and (for self-attention) rotated q, k, v: (batch, heads, tokens, d)."""
        if self.is_cross and context is None:
            raise ValueError("this cross-attention layer needs a context (text tokens); none was given")
        if not self.is_cross and context is not None:
            raise ValueError("a self-attention layer takes no context")
        src = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(src)), self._split(self.to_v(src))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None and context is None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None and mask.dtype == torch.bool and mask.ndim == 2:
            mask = mask[:, None, None, :]  # (batch, keys) -> broadcast over heads and queries
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def out(self, h: Tensor) -> Tensor:
        return self.to_out(h.transpose(1, 2).flatten(-2))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.processor(self, x, context, mask, rope)


def default_processor(attn: Attention, x: Tensor, context: Tensor | None, mask: Tensor | None,
                      rope: tuple[Tensor, Tensor] | None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with PyTorch's fused scaled-dot-product attention."""
    q, k, v = attn.qkv(x, context, rope)
    return attn.out(attn.attend(q, k, v, mask))


def attention_layers(model: nn.Module, kind: str = "all") -> Iterator[Attention]:
    """The model's attention layers: ``all``, ``self`` or ``cross``."""
    for module in model.modules():
        if isinstance(module, Attention) and (
            kind == "all" or (kind == "self") != module.is_cross
        ):
            yield module


def set_processor(model: nn.Module, processor: AttentionProcessor | None, kind: str = "all") -> int:
    """Install ``processor`` (None: the default) on the model's attention layers; returns how many."""
    count = 0
    for layer in attention_layers(model, kind):
        layer.processor = processor or default_processor
        count += 1
    return count


@contextmanager
def attention_processor(model: nn.Module, processor: AttentionProcessor, kind: str = "all",
                        where: Callable[[Attention], bool] | None = None) -> Iterator[int]:
    """Temporarily replace the processor of (some of) the model's attention layers."""
    layers = [a for a in attention_layers(model, kind) if where is None or where(a)]
    if not layers:
        raise ValueError(f"the model has no {kind} attention layers to hook"
                         + (" matching the filter" if where is not None else ""))
    saved = [a.processor for a in layers]
    for a in layers:
        a.processor = processor
    try:
        yield len(layers)
    finally:
        for a, p in zip(layers, saved, strict=True):
            a.processor = p


@functools.cache
def _mkldnn_linear_gelu_works() -> bool:
    """Whether this torch build has oneDNN's linear with a fused tanh-GELU epilogue (the op
    inductor emits on CPU) and it agrees with the unfused computation."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g) for shape in ((5, 8), (12, 8), (12,)))
    try:
        fused = op(x, w, b, "gelu", [], "tanh")
    except (RuntimeError, TypeError):
        return False
    return torch.allclose(fused, F.gelu(F.linear(x, w, b), approximate="tanh"), atol=1e-5)


def linear_gelu(x: Tensor, linear: nn.Linear) -> Tensor:
    """``gelu_tanh(linear(x))``. For float32 inference on the CPU it runs as one oneDNN matmul with
    the GELU in its epilogue, which skips a pass over the widest activation of a transformer block
    (31 % less time for DiT-S's MLP input at 4096 tokens; equal to 5e-7)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and linear.weight.dtype == torch.float32
            and type(linear) is nn.Linear and linear.bias is not None
            and not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and _mkldnn_linear_gelu_works()):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, linear.weight, linear.bias, "gelu", [], "tanh")
        return out.view(*x.shape[:-1], out.shape[-1])
    return F.gelu(linear(x), approximate="tanh")


class FeedForward(nn.Module):
    """Transformer MLP: GELU (tanh) or GEGLU (Shazeer 2020, as in latent diffusion)."""

    def __init__(self, dim: int, mult: float = 4.0, kind: str = "gelu"):
        super().__init__()
        hidden = int(dim * mult)
        self.kind = kind
        self.proj_in = nn.Linear(dim, hidden * 2 if kind == "geglu" else hidden)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "geglu":
            h, gate = self.proj_in(x).chunk(2, dim=-1)
            return self.proj_out(h * F.gelu(gate))
        return self.proj_out(linear_gelu(x, self.proj_in))


def zero_(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (zero-initialised outputs, adaLN-Zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def checkpointed(fn: Callable[..., Tensor], enabled: bool, *args: Any) -> Tensor:
    """Run ``fn(*args)``, with activation checkpointing when enabled and training."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
