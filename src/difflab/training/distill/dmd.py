"""Distribution matching distillation, improved (DMD2: Yin et al. 2024): a few-step generator
pulled toward the teacher's distribution by the difference of two denoisers — the teacher's
("real") and a "fake" one trained all along on the generator's own samples — with the fake network
updated several times per generator step (two time-scale updates) and, for a multi-step student,
backward simulation: the generator learns on inputs from its own earlier steps; optionally its GAN
head, a small classifier on the fake network's middle features that tells noised data from noised
generator samples, whose non-saturating loss the generator also gets.

The fake network, the GAN head and their optimizers are the objective's auxiliary state: the trainer checkpoints
and restores them (:meth:`DMDObjective.auxiliary`), so resume stays exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from difflab import predictions, schedules
from difflab.batch import per_sample
from difflab.denoiser import Denoiser
from difflab.processes import Process
from difflab.training.distill.teacher import Teacher
from difflab.training.losses import diffusion_loss
from difflab.training.optim import adamw

Tensor = torch.Tensor


class GANHead(nn.Module):
    """DMD2's discriminator (Sec. 4.3): a classifier on the fake network's features at one block
    (``block``, the network's middle by default): a 3x3 convolution, SiLU, global mean and a linear
    logit for image features (B, C, H, W); mean over tokens and a two-layer MLP for token or vector
    features (B, N, C) / (B, C). ``width`` is the features' channel count."""

    def __init__(self, block: str, width: int, image_features: bool):
        super().__init__()
        self.block, self.image_features = block, image_features
        if image_features:
            self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
        else:
            self.body = nn.Sequential(nn.Linear(width, width), nn.SiLU())
        self.logit = nn.Linear(width, 1)

    @classmethod
    def for_network(cls, network: Any, x: Tensor, t: Tensor, block: str = "", **cond: Any) -> GANHead:
        """A head for ``network``'s features at ``block`` (its middle block by default), their shape
        read from one forward pass on the probe input ``x`` at network time ``t``."""
        names = network.block_names()
        block = block or ("mid" if "mid" in names else names[len(names) // 2])
        if block not in names:
            raise ValueError(f"gan_block {block!r} is not a block of this network; its blocks: {', '.join(names)}")
        seen: list[Tensor] = []
        with torch.no_grad():
            capturing(network, block, seen)(x, t, **cond)
        features = seen[-1]
        return cls(block, features.shape[1] if features.ndim == 4 else features.shape[-1], features.ndim == 4)

    def forward(self, features: Tensor) -> Tensor:
        h = self.body(features.float())
        h = h.mean((2, 3)) if self.image_features else (h.mean(1) if h.ndim == 3 else h)
        return self.logit(h).squeeze(-1)


def capturing(network: Any, block: str | Sequence[str], seen: list[Tensor]) -> Callable[..., Tensor]:
    """``network`` as a callable that appends the output of its ``block`` (or of each of several
    blocks, in the order they run) to ``seen`` on each call (block hooks), so the features come from
    the very pass a denoiser or loss makes."""

    def capture(name: str, compute: Callable[[], Any], inputs: tuple) -> Any:
        out = compute()
        seen.append(out[0] if isinstance(out, tuple) else out)
        return out

    blocks = [block] if isinstance(block, str) else list(block)

    def run(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        with network.hook_blocks(dict.fromkeys(blocks, capture)):
            return network(x, t, **cond)

    return run


class DMDObjective:
    """The generator loss ``0.5 mean (x_g - sg(x_g - (D_fake - D_real) / w))^2`` at a random t
    (w = mean |x_g - D_real|, DMD's normalisation), after ``fake_updates`` diffusion-loss steps of
    the fake network on the generator's samples. ``steps``: the student's sampling steps (its
    ``trailing`` grid); with more than one, each sample's generator input is the student's own
    rollout to a random grid point (backward simulation). ``head``: DMD2's GAN head on the fake
    network's features, trained in each fake update with ``gan_fake_weight`` times the logistic loss
    of noised data (real) against noised generator samples (fake); the generator adds
    ``gan_weight`` times the non-saturating ``softplus(-head(features of its noised sample))``
    (DMD2's ImageNet weights: 3e-3 and 1e-2)."""

    def __init__(self, teacher: Teacher, process: Process, prediction: predictions.Prediction, fake: nn.Module, *,
                 steps: int = 1, fake_updates: int = 5, fake_lr: float = 1e-4,
                 t_range: tuple[float, float] = (0.02, 0.98), head: GANHead | None = None,
                 gan_weight: float = 3e-3, gan_fake_weight: float = 1e-2):
        if steps < 1 or fake_updates < 1:
            raise ValueError(f"steps and fake_updates must be >= 1, got {steps}, {fake_updates}")
        self.teacher, self.process, self.prediction = teacher, process, prediction
        self.fake, self.steps, self.fake_updates, self.t_range = fake, steps, fake_updates, t_range
        self.fake.train().requires_grad_(True)
        self.fake_optimizer = adamw(list(self.fake.parameters()), fake_lr)
        self.head, self.gan_weight, self.gan_fake_weight = head, float(gan_weight), float(gan_fake_weight)
        self.head_optimizer = adamw(list(head.parameters()), fake_lr) if head is not None else None

    def auxiliary(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        """What the trainer checkpoints beside the student: the fake network, the GAN head and their
        optimizers."""
        parts = {"fake": (self.fake, self.fake_optimizer)}
        if self.head is not None:
            parts["gan_head"] = (self.head, self.head_optimizer)
        return parts

    def _inputs(self, den: Denoiser, noise: Tensor, seeds: Tensor, cond: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Each sample's generator input and time: pure noise at t_max, or (backward simulation) the
        student's own rollout, without gradient, to grid point j of its ``steps``."""
        grid = schedules.get("trailing", self.process, self.steps).to(noise.device)
        x = float(self.process.sigma(grid[:1]).item()) * noise
        if self.steps == 1:
            return x, grid[0].expand(len(x)).to(noise.dtype)
        j = (seeds % self.steps).to(noise.device)
        g = torch.Generator(device="cpu").manual_seed(int(seeds[0]) % (2**62))
        state = x
        with torch.no_grad():
            for i in range(1, self.steps):  # the multistep consistency rollout: denoise, noise afresh
                x0 = den(state, grid[i - 1].to(noise.dtype), **cond)
                fresh = torch.randn(x0.shape, generator=g).to(x0)
                renoised = float(self.process.alpha(grid[i:i + 1]).item()) * x0 + \
                    float(self.process.sigma(grid[i:i + 1]).item()) * fresh
                state = torch.where(per_sample(j >= i, x0), renoised, state)
        return state, grid[j].to(noise.dtype)

    def __call__(self, net: Callable[..., Tensor], batch: dict[str, Tensor], **cond: Any) -> Tensor:
        noise, seeds = batch["noise"], batch["seeds"]
        den = Denoiser(net, self.process, self.prediction)
        x_in, t_in = self._inputs(den, noise, seeds, cond)
        x_g = den(x_in, t_in, **cond)
        g = torch.Generator(device="cpu").manual_seed(int(seeds[-1]) % (2**62))
        low, high = self.t_range
        fake = Denoiser(self.fake, self.process, self.prediction)
        with torch.enable_grad():  # the fake network follows the generator (two time-scale updates)
            for _ in range(self.fake_updates):
                t = (low + (high - low) * torch.rand(len(x_g), generator=g)).to(x_g.device)
                eps = torch.randn(x_g.shape, generator=g).to(x_g)
                loss = self._fake_loss(x_g.detach(), batch["x0"], t, eps, g, cond)
                self.fake_optimizer.zero_grad(set_to_none=True)
                if self.head_optimizer is not None:
                    self.head_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.fake.parameters(), 1.0)
                self.fake_optimizer.step()
                if self.head_optimizer is not None:
                    nn.utils.clip_grad_norm_(self.head.parameters(), 1.0)
                    self.head_optimizer.step()
        t = (low + (high - low) * torch.rand(len(x_g), generator=g)).to(x_g.device, x_g.dtype)
        eps = torch.randn(x_g.shape, generator=g).to(x_g)
        _, alpha, sigma = den.scales(x_g, t)
        gan = x_g.new_zeros(())
        if self.head is None:
            with torch.no_grad():
                fake_x0 = fake(alpha * x_g.detach() + sigma * eps, t, **cond)
        else:  # one pass of the fake network gives its estimate and, with the generator's gradient, the features
            seen: list[Tensor] = []
            self.fake.requires_grad_(False)
            self.head.requires_grad_(False)
            try:
                fake_x0 = Denoiser(capturing(self.fake, self.head.block, seen), self.process,
                                   self.prediction)(alpha * x_g + sigma * eps, t, **cond).detach()
                gan = nn.functional.softplus(-self.head(seen[-1])).mean()
            finally:
                self.fake.requires_grad_(True)
                self.head.requires_grad_(True)
        with torch.no_grad():
            x_t = alpha * x_g.detach() + sigma * eps
            real = self.teacher(x_t, t, **cond)
            weight = (x_g.detach() - real).abs().flatten(1).mean(1).clamp(min=1e-5)
            gradient = (fake_x0 - real) / per_sample(weight, x_g)
            target = x_g.detach() - gradient
        return 0.5 * (x_g - target).float().pow(2).mean() + self.gan_weight * gan

    def _fake_loss(self, x_g: Tensor, data: Tensor, t: Tensor, eps: Tensor, g: torch.Generator,
                   cond: dict[str, Any]) -> Tensor:
        """The fake network's diffusion loss on the generator's samples, plus (with a GAN head) the
        head's logistic loss: noised data real, the same pass's noised generator samples fake."""
        if self.head is None:
            return diffusion_loss(self.fake, x_g, self.process, self.prediction, t=t, noise=eps, **cond).mean()
        seen: list[Tensor] = []
        network = capturing(self.fake, self.head.block, seen)
        loss = diffusion_loss(network, x_g, self.process, self.prediction, t=t, noise=eps, **cond).mean()
        generated = seen[-1]
        real_eps = torch.randn(data.shape, generator=g).to(data)
        den = Denoiser(network, self.process, self.prediction)
        _, alpha, sigma = den.scales(data, t.to(data.dtype))
        den(alpha * data + sigma * real_eps, t, **cond)
        real_features = seen[-1]
        softplus = nn.functional.softplus
        gan = softplus(self.head(generated)).mean() + softplus(-self.head(real_features)).mean()
        return loss + self.gan_fake_weight * gan
