"""Guidance: wrappers of a denoiser that steer sampling toward its condition.

Each wrapper is itself a denoiser (``guided(x, t, **cond) -> x0``, ``.process``), so it works with
every sampler and every prediction: guidance is written once, on the x0 estimate. Because a
prediction's conversion to x0 is affine in the network output at fixed (x, t), guiding x0 is the
same as guiding eps or v for the linear rules (CFG, interval, autoguidance, ICG, PAG).

Every method takes ``interval=(lo, hi)``: guide only where the noise level ``sigma / alpha``
(EDM's sigma) lies in ``(lo, hi]``, and use the plain conditional denoiser elsewhere at the cost of
one evaluation (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample
and distribution quality in diffusion models").

The unconditional branch needs a null condition: class labels become -1 automatically; text
conditioning needs ``uncond=`` (the null prompt's encoding, which pipelines pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from difflab.batch import batch_times, per_sample
from difflab.hooks import network_of
from difflab.registry import Registry

Tensor = torch.Tensor
Cond = dict[str, Any]


def null_condition(cond: Cond, uncond: Cond | None = None) -> Cond:
    """The unconditional counterpart of ``cond``: ``uncond`` where given, class labels -1."""
    out = dict(uncond or {})
    for key, value in cond.items():
        if key in out:
            continue
        if key == "class_labels" and isinstance(value, Tensor):
            out[key] = torch.full_like(value, -1)
        elif value is None:
            out[key] = None
        else:
            raise ValueError(f"guidance needs the unconditional value of {key!r}: pass uncond={{{key!r}: ...}} "
                             "(for text, the encoding of the empty prompt)")
    return out


def _stack_conds(conds: list[Cond], batch: int) -> Cond:
    """Concatenate condition dicts along the batch (a batch-1 entry is expanded)."""
    keys = set(conds[0])
    for c in conds[1:]:
        if set(c) != keys:
            raise ValueError(f"conditional and unconditional inputs have different keys: {sorted(keys)} vs {sorted(c)}")
    out: Cond = {}
    for key in keys:
        values = [c[key] for c in conds]
        if all(v is None for v in values):
            out[key] = None
            continue
        if any(not isinstance(v, Tensor) for v in values):
            raise ValueError(f"condition {key!r} is a tensor in one branch and not in another")
        values = [v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for v in values]
        if len({v.dtype for v in values}) > 1:  # integer labels beside embeddings given directly
            dim = next(v.shape[1] for v in values if v.is_floating_point())
            raise ValueError(f"condition {key!r} mixes label indices and {dim}-d embeddings; pass one kind")
        out[key] = torch.cat(values)
    return out


def batched(denoiser: Callable[..., Tensor], x: Tensor, t: Tensor, conds: list[Cond]) -> list[Tensor]:
    """One network evaluation for several conditions of the same (x, t): outputs in ``conds`` order."""
    k = len(conds)
    out = denoiser(torch.cat([x] * k), torch.cat([t] * k), **_stack_conds(conds, x.shape[0]))
    return list(out.chunk(k))


def _per_sample_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1)


class Guidance(nn.Module):
    """Base class: holds the denoiser, the guidance scale and the optional interval.

    ``to_config()`` gives the method's name and settings as JSON (``settings`` names the
    attributes it adds to scale and interval); :func:`from_config` rebuilds it around a denoiser.
    What is not a setting but an input of the run (``uncond``, autoguidance's ``weak`` model) is
    passed again to :func:`from_config`."""

    name: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, denoiser: Any, scale: float, *, uncond: Cond | None = None,
                 interval: tuple[float, float] | None = None):
        super().__init__()
        if not hasattr(denoiser, "process"):
            raise TypeError("guidance wraps a difflab Denoiser (an object with .process)")
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            raise ValueError(f"the guidance scale must be a finite number, got {scale!r}")
        if interval is not None and not (len(interval) == 2 and 0 <= interval[0] < interval[1]):
            raise ValueError(f"interval must be (lo, hi) noise levels with 0 <= lo < hi, got {interval!r}")
        self.denoiser, self.process, self.scale = denoiser, denoiser.process, float(scale)
        self.uncond, self.interval = uncond, interval

    @classmethod
    def uses_null_condition(cls, options: dict[str, Any]) -> bool:
        """Whether the method with these options evaluates the unconditional (null-condition) branch,
        which only a model trained with condition dropout has."""
        return False

    def active(self, t: Tensor) -> Tensor | None:
        """Per sample: is guidance on at t (None: everywhere)."""
        if self.interval is None:
            return None
        alpha, sigma = self.process.alpha(t), self.process.sigma(t)
        level = torch.where(alpha > 0, sigma / alpha.clamp_min(1e-30), torch.full_like(sigma, float("inf")))
        return (level > self.interval[0]) & (level <= self.interval[1])

    def guide(self, x: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """(guided x0, conditional x0); subclasses implement it."""
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = batch_times(t, x)
        on = self.active(t)
        if on is not None and not bool(on.any()):
            return self.denoiser(x, t, **cond)
        guided, conditional = self.guide(x, t, cond)
        return self.select(on, guided, conditional)

    @staticmethod
    def select(on: Tensor | None, guided: Tensor, conditional: Tensor) -> Tensor:
        """The guided estimate where guidance is on (``on``: per sample, None: everywhere), the
        conditional one elsewhere."""
        if on is None or bool(on.all()):
            return guided
        return torch.where(per_sample(on, guided), guided, conditional)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, interval={self.interval}"

    def to_config(self) -> dict[str, Any]:
        interval = None if self.interval is None else [float(v) for v in self.interval]
        config = {"name": self.name, "scale": self.scale, "interval": interval}
        for key in self.settings:
            value = getattr(self, key)
            if callable(value):
                raise ValueError(f"{self.name} setting {key!r} is a function, which a config cannot hold; "
                                 "give it by name")
            config[key] = value
        return config


class CFG(Guidance):
    """Classifier-free guidance ``D_u + w (D_c - D_u)`` with one batched forward (Ho & Salimans 2022);
    ``rescale`` phi mixes in the prediction rescaled to the conditional one's standard deviation (Lin
    et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Alg. 2). Scale 1 is
    the conditional denoiser and costs one evaluation."""

    name = "cfg"
    reference = "Ho & Salimans 2022, Classifier-Free Diffusion Guidance"
    settings = ("rescale",)

    @classmethod
    def uses_null_condition(cls, options: dict[str, Any]) -> bool:
        return True

    def __init__(self, denoiser: Any, scale: float = 4.0, *, rescale: float = 0.0, **kw: Any):
        super().__init__(denoiser, scale, **kw)
        self.rescale = float(rescale)

    def guide(self, x: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        if self.scale == 1.0:
            d_c = self.denoiser(x, t, **cond)
            return d_c, d_c
        d_c, d_u = batched(self.denoiser, x, t, [cond, null_condition(cond, self.uncond)])
        guided = d_u + self.scale * (d_c - d_u)
        if self.rescale:
            dims = tuple(range(1, x.ndim))
            factor = d_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
            guided = guided * (self.rescale * factor + (1 - self.rescale))
        return guided, d_c


class APG(Guidance):
    """Adaptive projected guidance (Sadat et al. 2025, "Eliminating oversaturation and artifacts of high
    guidance scales in diffusion models"): the CFG update ``D_c - D_u`` split into its parts parallel
    and orthogonal to ``D_c``; the parallel part (which oversaturates) is weighted by ``eta``, the
    update's norm capped at ``norm_threshold``, and with ``momentum`` (negative in the paper) it is
    averaged over the sampler's steps. ``eta=1`` without cap or momentum is CFG. Momentum makes the
    wrapper stateful: build a new one (or call :meth:`reset`) per sampling run."""

    name = "apg"
    reference = "Sadat et al. 2025, Eliminating Oversaturation and Artifacts of High Guidance Scales"
    settings = ("eta", "norm_threshold", "momentum")

    @classmethod
    def uses_null_condition(cls, options: dict[str, Any]) -> bool:
        return True

    def __init__(self, denoiser: Any, scale: float = 4.0, *, eta: float = 0.0, norm_threshold: float | None = None,
                 momentum: float = 0.0, **kw: Any):
        super().__init__(denoiser, scale, **kw)
        self.eta, self.norm_threshold, self.momentum = float(eta), norm_threshold, float(momentum)
        self.running: Tensor | None = None

    def reset(self) -> None:
        self.running = None

    def guide(self, x: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        d_c, d_u = batched(self.denoiser, x, t, [cond, null_condition(cond, self.uncond)])
        diff = d_c - d_u
        if self.momentum:
            self.running = diff if self.running is None else diff + self.momentum * self.running
            diff = self.running
        if self.norm_threshold:
            norm = diff.flatten(1).norm(dim=1)
            diff = diff * per_sample((self.norm_threshold / norm.clamp_min(1e-12)).clamp(max=1.0), diff)
        unit = d_c / per_sample(d_c.flatten(1).norm(dim=1).clamp_min(1e-12), d_c)
        parallel = per_sample(_per_sample_dot(diff, unit), diff) * unit
        update = (diff - parallel) + self.eta * parallel
        return d_c + (self.scale - 1) * update, d_c


class Autoguidance(Guidance):
    """Guide a model with a weaker version of itself: ``D_w + s (D - D_w)`` (Karras et al. 2024,
    "Guiding a diffusion model with a bad version of itself"). Both see the same condition, so it
    needs no unconditional training; the weak model is e.g. smaller or trained for less long."""

    name = "autoguidance"
    reference = "Karras et al. 2024, Guiding a Diffusion Model with a Bad Version of Itself"

    def __init__(self, denoiser: Any, weak: Any, scale: float = 2.0, **kw: Any):
        super().__init__(denoiser, scale, **kw)
        if getattr(weak, "process", None) is None:
            raise TypeError("autoguidance needs a weak difflab Denoiser (an object with .process)")
        if repr(weak.process) != repr(self.process):
            raise ValueError(f"the weak model's process {weak.process!r} differs from the model's {self.process!r}")
        self.weak = weak

    def guide(self, x: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        d = self.denoiser(x, t, **cond)
        d_w = self.weak(x, t, **cond)
        return d_w + self.scale * (d - d_w), d


class ICG(Guidance):
    """Independent condition guidance (Sadat et al. 2025, "No training, no problem: rethinking
    classifier-free guidance"): CFG whose unconditional branch is the conditional model at a random
    condition independent of the sample, so a model trained without condition dropout can be guided.
    Class labels become random Gaussian embeddings with the statistics of the network's label table
    (for a callable without one, e.g. an analytic model, uniformly random labels of ``num_classes``);
    text embeddings become Gaussian vectors with the given ones' statistics. The draw is fixed by
    ``seed``."""

    name = "icg"
    reference = "Sadat et al. 2025, No Training, No Problem: Rethinking Classifier-Free Guidance"
    settings = ("num_classes", "seed")

    def __init__(self, denoiser: Any, scale: float = 3.0, *, num_classes: int | None = None, seed: int = 0,
                 **kw: Any):
        super().__init__(denoiser, scale, **kw)
        self.network = network_of(denoiser)  # its label embedding, through the hook interface
        self.label_table = self.network.class_embedding_table() if self.network is not None else None
        self.num_classes, self.seed = num_classes, seed

    def random_condition(self, cond: Cond) -> Cond:
        g = torch.Generator().manual_seed(self.seed)

        def gaussian_like(ref: Tensor, shape: tuple[int, ...]) -> Tensor:
            ref = ref.detach()
            noise = torch.randn(shape, generator=g, dtype=ref.dtype).to(ref.device)
            return ref.mean() + ref.std() * noise

        out: Cond = {}
        for key, value in cond.items():
            if key == "class_labels" and isinstance(value, Tensor) and not value.is_floating_point():
                if self.label_table is not None:
                    out[key] = gaussian_like(self.label_table, (len(value), self.label_table.shape[1]))
                elif self.num_classes:
                    out[key] = torch.randint(self.num_classes, value.shape, generator=g).to(value.device)
                else:
                    raise ValueError("ICG with class labels needs num_classes to draw independent labels")
            elif isinstance(value, Tensor) and value.is_floating_point() and key != "context_mask":
                out[key] = gaussian_like(value, tuple(value.shape))
            else:
                out[key] = value
        return out

    def guide(self, x: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        random = self.random_condition(cond)
        labels = cond.get("class_labels")
        if self.label_table is not None and isinstance(labels, Tensor) and not labels.is_floating_point():
            cond = {**cond, "class_labels": self.network.embed_class_labels(labels)}  # to batch with the random ones
        d_c, d_r = batched(self.denoiser, x, t, [cond, random])
        return d_r + self.scale * (d_c - d_r), d_c


class PAG(Guidance):
    """Perturbed-attention guidance (Ahn et al. 2024, "Self-rectifying diffusion sampling with
    perturbed-attention guidance"): ``D + s (D - D_perturbed)`` where the perturbed pass replaces the
    self-attention map of the chosen layers by the identity (each token attends to itself), through
    the attention hook point; with ``cfg_scale`` > 1 CFG is added in the same batched forward.
    ``layers``: "mid" (the middle self-attention layer, as diffusers' default), "all", or a filter."""

    name = "pag"
    reference = "Ahn et al. 2024, Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance"
    settings = ("cfg_scale", "layers")

    @classmethod
    def uses_null_condition(cls, options: dict[str, Any]) -> bool:
        return float(options.get("cfg_scale", 1.0)) != 1.0

    def __init__(self, denoiser: Any, scale: float = 3.0, *, cfg_scale: float = 1.0,
                 layers: str | Sequence[str] | Callable[[str], bool] = "mid", **kw: Any):
        super().__init__(denoiser, scale, **kw)
        self.network = network_of(denoiser)
        found = self.network.attention_names("self") if self.network is not None else []
        if not found:
            raise ValueError("PAG perturbs self-attention, but this denoiser's network has no self-attention layers "
                             "(use CFG or autoguidance instead)")
        if layers == "mid":
            chosen = [found[len(found) // 2]]
        elif layers == "all":
            chosen = found
        elif callable(layers):
            chosen = [name for name in found if layers(name)]
        elif isinstance(layers, list | tuple):
            chosen = [str(name) for name in layers]
            unknown = sorted(set(chosen) - set(found))
            if unknown:
                raise ValueError(f"no self-attention layer(s) {', '.join(unknown)}; this network's are: "
                                 f"{', '.join(found)}")
        else:
            raise ValueError(f"layers must be 'mid', 'all', a list of layer names or a filter, got {layers!r}")
        if not chosen:
            raise ValueError("the layer filter selected no self-attention layer")
        self.layers = layers if isinstance(layers, str) or callable(layers) else chosen
        self.chosen, self.cfg_scale = chosen, float(cfg_scale)

    def guide(self, x: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        conds = [cond, cond] + ([null_condition(cond, self.uncond)] if self.cfg_scale != 1.0 else [])
        b = x.shape[0]

        def identity_for_perturbed(attn, h, context, mask, rope):
            q, k, v = attn.qkv(h, context, rope)
            keep = torch.cat([q[:b], q[2 * b:]]), torch.cat([k[:b], k[2 * b:]]), torch.cat([v[:b], v[2 * b:]])
            kept_mask = None if mask is None else torch.cat([mask[:b], mask[2 * b:]])
            out = attn.attend(*keep, kept_mask)
            return attn.out(torch.cat([out[:b], v[b: 2 * b], out[b:]]))  # identity map for rows b..2b: output = v

        with self.network.hook_attention(identity_for_perturbed, "self", self.chosen):
            outs = batched(self.denoiser, x, t, conds)
        d_c, d_p = outs[0], outs[1]
        guided = d_c + self.scale * (d_c - d_p)
        if len(outs) == 3:
            guided = guided + (self.cfg_scale - 1) * (d_c - outs[2])
        return guided, d_c


REGISTRY: Registry[type[Guidance]] = Registry("guidance")
for _method in (CFG, APG, Autoguidance, ICG, PAG):
    REGISTRY.add(_method.name, _method, _method.reference)


def available() -> list[str]:
    return sorted(REGISTRY)


def get(name: str) -> type[Guidance]:
    return REGISTRY.get(name)


def guide(denoiser: Any, method: str = "cfg", **options: Any) -> Guidance:
    """Wrap ``denoiser`` in the named guidance with its options (``scale``, ``interval``, ...)."""
    return get(method)(denoiser, **options)


def from_config(config: dict[str, Any], denoiser: Any, **inputs: Any) -> Guidance:
    """Rebuild :meth:`Guidance.to_config` around ``denoiser``; ``inputs`` are the run's own
    (``uncond``, ``weak``)."""
    config = dict(config)
    return guide(denoiser, config.pop("name", None), **config, **inputs)
