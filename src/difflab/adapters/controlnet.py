"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the frozen U-Net's embeddings, down blocks and middle reads the noisy input plus
the features of a control image (a small convolutional encoder), and feeds its features through
zero-initialised 1x1 convolutions into the frozen U-Net's skip connections and middle (the network
hook interface's residual points). At the start every residual is zero: the controlled model is the
base model exactly, and training only adds what the control explains.

Control is a condition of the denoiser (:class:`Controlled`), so it composes with every sampler and
every guidance method. Under classifier-free guidance the control stays on both branches and only
the text is dropped from the unconditional one (as diffusers' ``StableDiffusionControlNetPipeline``
does unless ``guess_mode``): guidance then sharpens what the prompt asks for within the layout the
control fixes, instead of amplifying the control itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.adapters.files import read_adapter, save_adapter
from difflab.batch import batch_times, tiled
from difflab.hooks import network_of

Tensor = torch.Tensor
FORMAT = "difflab-controlnet"


class ControlError(ValueError):
    pass


class HintEncoder(nn.Module):
    """Control image -> features at the network's input resolution (ControlNet's ``input_hint_block``:
    3x3 convolutions with SiLU, a stride-2 one per halving, the last one zero)."""

    def __init__(self, channels: int, out_channels: int, downscale: int, width: int = 16):
        super().__init__()
        halvings = round(math.log2(downscale)) if downscale >= 1 else -1
        if 2 ** halvings != downscale:
            raise ControlError(f"the control image must be a power-of-two multiple of the network's feature grid, "
                               f"got {downscale}")
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.SiLU()]
        ch = width
        for _ in range(halvings):
            wider = min(2 * ch, 256)
            layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(),
                       nn.Conv2d(ch, wider, 3, stride=2, padding=1), nn.SiLU()]
            ch = wider
        layers.append(nn.Conv2d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.body = nn.Sequential(*layers)

    def forward(self, control: Tensor) -> Tensor:
        return self.body(control)


class ControlNet(nn.Module):
    """A ControlNet for ``network`` taking control images of ``control_channels`` at ``downscale``
    times the network's input size (a latent model's: the VAE's factor). For a difflab U-Net the
    copy is the whole encoder and middle (Zhang et al. 2023); for a DiT it is the first ``blocks``
    blocks (half by default) with zero-initialised linear outputs into the same blocks of the frozen
    one (PixArt's ControlNet-Transformer, Chen et al. 2024)."""

    def __init__(self, network: Any, control_channels: int, *, downscale: int = 1, hint_width: int = 16,
                 blocks: int | None = None):
        super().__init__()
        if not all(hasattr(network, a) for a in ("encoder_copy", "control_features", "hint_spec")):
            raise ControlError(f"a ControlNet needs a difflab U-Net or DiT (a network with residual points and "
                               f"control features); got a {type(network).__name__}")
        if isinstance(control_channels, bool) or not isinstance(control_channels, int) or control_channels < 1:
            raise ControlError(f"control_channels must be a whole number >= 1, got {control_channels!r}")
        if isinstance(downscale, bool) or not isinstance(downscale, int) or downscale < 1:
            raise ControlError(f"downscale must be a whole number >= 1, got {downscale!r}")
        self.settings = {"control_channels": control_channels, "downscale": downscale, "hint_width": hint_width,
                         "blocks": blocks, "network": network.to_config()}
        try:
            self.copy = network.encoder_copy(blocks)
        except ValueError as err:
            raise ControlError(str(err)) from None
        self.copy.requires_grad_(True)
        widths = self.copy.residual_widths()
        self.points = list(widths)
        channels, stride = network.hint_spec()
        self.hint = HintEncoder(control_channels, channels, downscale * stride, hint_width)
        tokens = network.residual_layout == "tokens"
        self.zero = nn.ModuleDict({p.replace(".", "_"): nn.Linear(w, w) if tokens else nn.Conv2d(w, w, 1)
                                   for p, w in widths.items()})
        for layer in self.zero.values():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.to(next(network.parameters()).device)

    def check_control(self, control: Tensor, x: Tensor) -> None:
        c, scale = self.settings["control_channels"], self.settings["downscale"]
        want = (c, x.shape[-2] * scale, x.shape[-1] * scale)
        if control.ndim != 4 or tuple(control.shape[1:]) != want:
            raise ControlError(f"this ControlNet takes control images of shape (N, {want[0]}, {want[1]}, {want[2]}) "
                               f"for inputs of {tuple(x.shape[-2:])}; got {tuple(control.shape)}")

    def forward(self, x: Tensor, t: Tensor, control: Tensor, **cond: Any) -> dict[str, Tensor]:
        """The residuals ``{point: tensor}`` for the network's input ``x`` at model time ``t`` (what
        the base network is called with) under ``control`` and the network's conditions."""
        self.check_control(control, x)
        cond = {k: v for k, v in cond.items() if k != "residuals"}
        features = self.copy.control_features(x, t, self.hint(control.to(x.dtype)), **cond)
        return {point: self.zero[point.replace(".", "_")](h) for point, h in features.items()}

    def check_fits(self, network: Any) -> None:
        """Refuse a network of another architecture than the one this ControlNet was made for."""
        _same_network(self.settings["network"], network)

    # --- files ----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, base_identity: str = "") -> Path:
        return save_adapter(directory, "controlnet", FORMAT, self.state_dict(), self.settings, base_identity)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, network: Any, *, base_identity: str | None = None,
                        allow_other_base: bool = False) -> ControlNet:
        """Load a saved ControlNet for ``network``; one for another architecture is refused, one
        trained on other weights too unless ``allow_other_base``."""
        meta, weights = read_adapter(directory, "controlnet", FORMAT, "ControlNet", ControlError,
                                     base_identity=base_identity, allow_other_base=allow_other_base)
        _same_network(meta.get("network") or {}, network)
        net = cls(network, int(meta["control_channels"]), downscale=int(meta["downscale"]),
                  hint_width=int(meta["hint_width"]), blocks=meta.get("blocks"))
        net.load_state_dict(weights)
        return net.eval()


def _same_network(saved: dict[str, Any], network: Any) -> None:
    theirs = network.to_config()
    diff = sorted(k for k in set(saved) | set(theirs) if k != "gradient_checkpointing"
                  and _plain(saved.get(k)) != _plain(theirs.get(k)))
    if diff:
        raise ControlError(f"this ControlNet was made for another network: its config differs in {diff}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass
class Control:
    """One control of a sampling call: a ControlNet, its control images (N, C, H, W), its weight,
    and the interval of process time ``t`` (1 = pure noise) where it acts."""

    controlnet: ControlNet
    image: Tensor
    scale: float = 1.0
    start: float = 1.0
    end: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale):
            raise ControlError(f"a control's scale must be finite, got {self.scale}")
        if not 0.0 <= self.end <= self.start <= 1.0:
            raise ControlError(f"a control acts for t in [end, start] with 0 <= end <= start <= 1; got start="
                               f"{self.start}, end={self.end}")


class Controlled(nn.Module):
    """A denoiser under one or more controls (multi-ControlNet: their residuals add, each times its
    scale, while ``t`` lies in its interval). Wrap the plain denoiser, under guidance: on a guidance
    batch (a multiple of the images) the control images are tiled, so every branch keeps them."""

    def __init__(self, denoiser: Any, controls: Control | Sequence[Control]):
        super().__init__()
        network, base = network_of(denoiser), denoiser
        while base is not None and not hasattr(base, "network_inputs"):
            base = getattr(base, "denoiser", None)
        if network is None or base is None:
            raise ControlError("control needs a difflab Denoiser over a difflab network (wrap the plain one, "
                               "before guidance)")
        self.denoiser, self.base, self.process = denoiser, base, denoiser.process
        self.controls = [controls] if isinstance(controls, Control) else list(controls)
        if not self.controls:
            raise ControlError("no controls given")
        for c in self.controls:
            c.controlnet.check_fits(network)
        self.nets = nn.ModuleList([c.controlnet for c in self.controls])

    def residuals(self, x: Tensor, t: Tensor | float, **cond: Any) -> dict[str, Tensor]:
        """The summed, weighted residuals of the controls for state ``x`` at time ``t``."""
        t = batch_times(t, x)
        x_in, time = self.base.network_inputs(x, t)
        net_cond = {**self.base.cond, **cond}
        total: dict[str, Tensor] = {}
        for c in self.controls:
            active = ((t <= c.start) & (t >= c.end)).to(x.dtype)
            if c.scale == 0 or not bool(active.any()):
                continue
            image = tiled(c.image.to(x.device), x.shape[0], "control images", ControlError)
            weight = c.scale * active
            for point, r in c.controlnet(x_in, time, image, **net_cond).items():
                r = weight.view(-1, *([1] * (r.ndim - 1))) * r  # channels (U-Net) or tokens (DiT)
                total[point] = total[point] + r if point in total else r
        return total

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        residuals = self.residuals(x, t, **{k: v for k, v in cond.items() if k != "residuals"})
        for point, r in (cond.pop("residuals", None) or {}).items():  # controls nested in controls add up
            residuals[point] = residuals[point] + r if point in residuals else r
        return self.denoiser(x, t, residuals=residuals or None, **cond)

