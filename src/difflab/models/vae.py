"""KL autoencoder for latent diffusion (Rombach et al. 2022): encoder, diagonal-Gaussian latent,
decoder, the latent scaling factor, and its loss (reconstruction + KL, optional patch discriminator
as in Esser et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.models.base import Network, check_image
from difflab.models.conv_blocks import Downsample, ResBlock, SpatialTransformer, Upsample
from difflab.models.layers import GroupNorm

Tensor = torch.Tensor


@dataclass
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)  # downsampling factor 2 ** (len - 1)
    num_res_blocks: int = 1
    mid_attention: bool = True
    norm_groups: int = 32
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    gradient_checkpointing: bool = False
    asymmetric_downsample: bool = False  # pad right/bottom before a stride-2 conv (diffusers' AutoencoderKL)
    quant_conv: bool = False  # 1x1 convolutions after the encoder and before the decoder (AutoencoderKL)


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar))."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions (>= 0)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class VAE(Network):
    """``encode(x) -> DiagonalGaussian``, ``decode(z) -> x``; latents for diffusion are
    ``(z - shift_factor) * scaling_factor`` (:meth:`to_latent` / :meth:`from_latent`)."""

    config_class = VAEConfig
    kind = "vae"

    def __init__(self, config: VAEConfig):
        super().__init__(config)
        c = config
        g = c.norm_groups
        chans = [c.base_channels * m for m in c.channel_mult]
        self.downsampling = 2 ** (len(chans) - 1)
        enc: list[nn.Module] = [nn.Conv2d(c.in_channels, chans[0], 3, padding=1)]
        ch = chans[0]
        for level, out in enumerate(chans):
            for _ in range(c.num_res_blocks):
                enc.append(ResBlock(ch, out, groups=g))
                ch = out
            if level != len(chans) - 1:
                enc.append(Downsample(ch, asymmetric=c.asymmetric_downsample))
        enc += self._middle(ch, g, c.mid_attention)
        enc += [GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(ch, 2 * c.latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(c.latent_channels, ch, 3, padding=1), *self._middle(ch, g, c.mid_attention)]
        for level, out in reversed(list(enumerate(chans))):
            for _ in range(c.num_res_blocks + 1):
                dec.append(ResBlock(ch, out, groups=g))
                ch = out
            if level:
                dec.append(Upsample(ch))
        dec += [GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(ch, c.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        moments, latent = 2 * c.latent_channels, c.latent_channels
        self.quant = nn.Conv2d(moments, moments, 1) if c.quant_conv else nn.Identity()
        self.post_quant = nn.Conv2d(latent, latent, 1) if c.quant_conv else nn.Identity()

    @staticmethod
    def _middle(ch: int, groups: int, attention: bool) -> list[nn.Module]:
        layers: list[nn.Module] = [ResBlock(ch, ch, groups=groups)]
        if attention:
            layers.append(SpatialTransformer(ch, 1, groups=groups, name="vae.mid"))
        return [*layers, ResBlock(ch, ch, groups=groups)]

    def _run(self, seq: nn.Sequential, x: Tensor) -> Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint_sequential(seq, 2, x, use_reentrant=False)
        return seq(x)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        check_image("VAE", x, self.config.in_channels, self.downsampling, "the downsampling factor")
        return DiagonalGaussian(self.quant(self._run(self.encoder, x)))

    def decode(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"VAE decodes latents (batch, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        return self._run(self.decoder, self.post_quant(z))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    def to_latent(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_latent(self, latent: Tensor) -> Tensor:
        return self.decode(latent / self.config.scaling_factor + self.config.shift_factor)

    @torch.no_grad()
    def fit_scaling(self, images: Tensor, batch_size: int = 64) -> float:
        """Set ``scaling_factor`` to 1 / std of the latents of ``images`` (Rombach et al. Sec. 4.3.2),
        so diffusion sees unit-variance latents; returns it."""
        zs = torch.cat([self.encode(images[i : i + batch_size]).mode() for i in range(0, len(images), batch_size)])
        self.config.shift_factor = 0.0
        self.config.scaling_factor = float(1.0 / zs.float().std())
        return self.config.scaling_factor


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017) as used by VQGAN / latent diffusion's autoencoders."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers):
            nxt = channels * min(2**i, 8)
            mods += [nn.Conv2d(ch, nxt, 4, stride=2, padding=1), nn.GroupNorm(min(32, nxt), nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        mods.append(nn.Conv2d(ch, 1, 4, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def vae_loss(recon: Tensor, target: Tensor, posterior: DiagonalGaussian, *, kl_weight: float = 1e-6,
             discriminator: PatchDiscriminator | None = None, adversarial_weight: float = 0.1) -> dict[str, Tensor]:
    """Generator-side loss: L1 + MSE reconstruction (per pixel), ``kl_weight`` x KL (per latent
    element), and with a discriminator the hinge generator loss. Returns the parts and ``total``."""
    rec = F.l1_loss(recon, target) + F.mse_loss(recon, target)
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    total = rec + kl_weight * kl
    out = {"reconstruction": rec, "kl": kl}
    if discriminator is not None:
        adv = -discriminator(recon).mean()
        total = total + adversarial_weight * adv
        out["adversarial"] = adv
    out["total"] = total
    return out


def discriminator_loss(discriminator: PatchDiscriminator, real: Tensor, fake: Tensor) -> Tensor:
    """Hinge loss of the patch discriminator (Lim & Ye 2017)."""
    return 0.5 * (F.relu(1.0 - discriminator(real)).mean() + F.relu(1.0 + discriminator(fake.detach())).mean())
