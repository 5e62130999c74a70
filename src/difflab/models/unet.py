"""ADM / Stable-Diffusion style U-Net (Dhariwal & Nichol 2021; Rombach et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab.batch import batch_times
from difflab.models.base import Network, check_conditioning, check_image
from difflab.models.conv_blocks import Downsample, ResBlock, SpatialTransformer, Upsample
from difflab.models.layers import (
    GroupNorm,
    LabelEmbedder,
    PooledEmbedder,
    TimestepEmbedder,
    checkpointed,
    guidance_features,
    sinusoidal_embedding,
    zero_,
)

Tensor = torch.Tensor


@dataclass
class UNetConfig:
    in_channels: int = 3
    out_channels: int | None = None  # default: in_channels
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1, 2)  # indices into channel_mult that get attention
    head_dim: int = 32
    transformer_depth: int | tuple[int, ...] = 1  # transformer blocks per attention (one value, or per level)
    dropout: float = 0.0
    num_classes: int | None = None
    context_dim: int | None = None  # text tokens for cross-attention
    pooled_dim: int | None = None  # pooled text embedding added to the time embedding
    concat_channels: int = 0  # inputs concatenated to x (an inpainting model's mask and masked image)
    step_size_embedding: bool = False  # a shortcut model's step size (forward's step_size=)
    guidance_embedding: bool = False  # a latent consistency model's guidance scale (forward's guidance_scale=)
    # LCM's own form of it (diffusers' time_cond_proj_dim): w = scale - 1 as sin-cos features of this width,
    # through a bias-free linear map onto the time features before the time MLP
    guidance_projection_dim: int | None = None
    norm_groups: int = 32
    qk_norm: bool = False
    fp32_norm: bool = False
    time_embedding: str = "sinusoidal"
    time_cos_first: bool = True  # diffusers' flip_sin_to_cos
    time_freq_shift: float = 0.0  # diffusers' freq_shift (downscale_freq_shift)
    time_mode: str = "scale_shift"  # or "additive": diffusers' resnet_time_scale_shift="default"
    norm_eps: float = 1e-6  # diffusers' norm_eps is 1e-5
    mid_attention_norm: bool = True  # diffusers' UNetMidBlock2D drops it unless resnet_time_scale_shift="default"
    channels_last: bool = True  # NHWC convolutions: faster with oneDNN and cuDNN
    num_heads: tuple[int, ...] | None = None  # attention heads per level (None: width // head_dim), as SD's U-Nets
    attention_bias: bool = True  # biases on the q/k/v projections of text-conditioned attention (SD: none)
    transformer_norm_eps: float | None = None  # GroupNorm eps of text-conditioned attention (None: norm_eps)
    layer_norm_eps: float = 1e-6  # the transformer blocks' LayerNorms (diffusers: 1e-5)
    pooled_time_ids: int = 0  # SDXL: this many size/crop numbers (forward's time_ids) embedded beside the pooled text
    pooled_time_dim: int = 256  # the sinusoidal width of each of them
    gradient_checkpointing: bool = False


class UNet(Network):
    """U-Net with scale-shift residual blocks, attention at chosen levels, optional class labels,
    cross-attention to text tokens and a pooled embedding; zero-initialised output.

    ``forward(x, t, class_labels=None, context=None, context_mask=None, pooled=None, concat=None,
    step_size=None, guidance_scale=None)``; ``step_size`` / ``guidance_scale`` with
    ``step_size_embedding`` / ``guidance_embedding`` (shortcut models, latent consistency models);
    use class label -1 (or ``num_classes``) for the unconditional "null" class. ``concat``: the
    ``concat_channels`` extra input channels (an inpainting model's mask and masked image, as Stable
    Diffusion's inpainting U-Nets take them), joined to x before the first convolution.
    """

    config_class = UNetConfig
    kind = "unet"
    encoder_only = False
    residual_layout = "channels"  # residuals are (batch, channels, H, W)

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        c = config
        out_ch = c.out_channels or c.in_channels
        mc, emb_dim = c.model_channels, 4 * c.model_channels
        self.time_embed = TimestepEmbedder(emb_dim, frequency_dim=mc, kind=c.time_embedding,
                                           cos_first=c.time_cos_first, freq_shift=c.time_freq_shift)
        self.label_embed = LabelEmbedder(c.num_classes, emb_dim) if c.num_classes else None
        self.pooled_embed = (PooledEmbedder(c.pooled_dim + c.pooled_time_ids * c.pooled_time_dim, emb_dim)
                             if c.pooled_dim else None)
        self.scalar_embedders(emb_dim, mc)
        self.guidance_proj = None
        if c.guidance_projection_dim:
            if not c.guidance_embedding:
                raise ValueError("guidance_projection_dim is a form of the guidance embedding: set guidance_embedding")
            self.guidance_embed, self.guidance_proj = None, nn.Linear(c.guidance_projection_dim, mc, bias=False)
        self.conv_in = nn.Conv2d(c.in_channels + c.concat_channels, mc, 3, padding=1)

        if c.num_heads is not None and len(c.num_heads) != len(c.channel_mult):
            raise ValueError(f"num_heads gives {len(c.num_heads)} levels' heads; the U-Net has "
                             f"{len(c.channel_mult)} levels (channel_mult)")

        if not isinstance(c.transformer_depth, int) and len(c.transformer_depth) != len(c.channel_mult):
            raise ValueError(f"transformer_depth gives {len(c.transformer_depth)} levels' depths; the U-Net has "
                             f"{len(c.channel_mult)} levels (channel_mult)")

        def attn(ch: int, name: str, level: int, norm: bool = True) -> SpatialTransformer:
            heads = max(1, ch // c.head_dim) if c.num_heads is None else c.num_heads[level]
            depth = c.transformer_depth if isinstance(c.transformer_depth, int) else c.transformer_depth[level]
            eps = c.norm_eps if c.transformer_norm_eps is None or c.context_dim is None else c.transformer_norm_eps
            return SpatialTransformer(ch, heads, context_dim=c.context_dim, depth=depth,
                                      groups=c.norm_groups, qk_norm=c.qk_norm, fp32_norm=c.fp32_norm, name=name,
                                      eps=eps, norm=norm, bias=c.attention_bias, layer_norm_eps=c.layer_norm_eps)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, c.dropout, c.norm_groups, c.fp32_norm, eps=c.norm_eps,
                            time_mode=c.time_mode)

        self.down = nn.ModuleList()
        skips, ch = [mc], mc
        for level, mult in enumerate(c.channel_mult):
            for i in range(c.num_res_blocks):
                block = nn.ModuleList([res(ch, mult * mc)])
                ch = mult * mc
                if level in c.attention_levels:
                    block.append(attn(ch, f"down{level}.{i}", level))
                self.down.append(block)
                skips.append(ch)
            if level != len(c.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)
        last = len(c.channel_mult) - 1
        self.mid = nn.ModuleList([res(ch, ch), attn(ch, "mid", last, c.mid_attention_norm), res(ch, ch)])
        self.skip_widths = tuple(skips)  # the channels at skip.0 .. skip.N (the middle has the last)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                block = nn.ModuleList([res(ch + skips.pop(), mult * mc)])
                ch = mult * mc
                if level in c.attention_levels:
                    block.append(attn(ch, f"up{level}.{i}", level))
                if level and i == c.num_res_blocks:
                    block.append(Upsample(ch))
                self.up.append(block)
        self.norm_out = GroupNorm(c.norm_groups, ch, eps=c.norm_eps, fp32=c.fp32_norm)
        self.conv_out = zero_(nn.Conv2d(ch, out_ch, 3, padding=1))
        self.downsampling = 2 ** (len(c.channel_mult) - 1)
        if c.channels_last:
            self.to(memory_format=torch.channels_last)

    def _check(self, x: Tensor, class_labels, context) -> None:
        check_image("UNet", x, self.config.in_channels, self.downsampling, "the downsampling factor")
        check_conditioning("UNet", self.config, class_labels, context)

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        return [*((f"down.{i}", b) for i, b in enumerate(self.down)), ("mid", self.mid),
                *((f"up.{i}", b) for i, b in enumerate(self.up))]

    def residual_points(self) -> list[str]:
        """``skip.0`` (after the input convolution) .. ``skip.N`` (after each down block), ``middle``."""
        return [*(f"skip.{i}" for i in range(len(self.down) + 1)), "middle"]

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, pooled: Tensor | None = None,
                residuals: dict[str, Tensor] | None = None, concat: Tensor | None = None,
                step_size: Tensor | None = None, guidance_scale: Tensor | None = None,
                time_ids: Tensor | None = None) -> Tensor:
        if self.encoder_only:
            raise ValueError("this U-Net is an encoder copy (a ControlNet's): it has no decoder; call encode()")
        residuals = self.check_residuals(residuals)
        hs, h, emb = self.encode(x, t, class_labels, context, context_mask, pooled, concat, step_size=step_size,
                                 guidance_scale=guidance_scale, time_ids=time_ids)
        if residuals:  # ControlNet: added to the skip connections and the middle, after the down pass
            hs = [s + residuals[f"skip.{i}"] if f"skip.{i}" in residuals else s for i, s in enumerate(hs)]
            h = h + residuals["middle"] if "middle" in residuals else h
        for i, block in enumerate(self.up):
            h = self.run_block(f"up.{i}", self._run, block, torch.cat([h, hs.pop()], dim=1), emb, context,
                               context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))

    def encode(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, context: Tensor | None = None,
               context_mask: Tensor | None = None, pooled: Tensor | None = None, concat: Tensor | None = None,
               hint: Tensor | None = None, step_size: Tensor | None = None,
               guidance_scale: Tensor | None = None, time_ids: Tensor | None = None
               ) -> tuple[list[Tensor], Tensor, Tensor]:
        """The down pass and the middle: (the skip features ``skip.0..N``, the middle's output, the
        time/condition embedding). ``hint`` is added after the input convolution (ControlNet's
        conditioning features, Zhang et al. 2023)."""
        self._check(x, class_labels, context)
        if self.config.concat_channels:
            want = (x.shape[0], self.config.concat_channels, *x.shape[2:])
            if concat is None or tuple(concat.shape) != want:
                raise ValueError(f"this UNet takes {self.config.concat_channels} extra input channels (concat=, "
                                 f"shape {want}: an inpainting model's mask and masked image), got "
                                 f"{None if concat is None else tuple(concat.shape)}")
            x = torch.cat([x, concat.to(x.dtype)], 1)
        elif concat is not None:
            raise ValueError("this UNet takes no extra input channels (concat=); its config has concat_channels=0")
        if self.guidance_proj is not None:  # LCM (Luo et al. 2023): the scale joins the time features
            features = guidance_features(guidance_scale, x, self.config.guidance_projection_dim)
            emb = self.time_embed(batch_times(t, x), self.guidance_proj(features.to(self.guidance_proj.weight.dtype)))
            guidance_scale = None
        else:
            emb = self.time_embed(batch_times(t, x))
        if self.label_embed is not None:
            emb = emb + self.label_embed(class_labels)
        if self.pooled_embed is not None and pooled is not None:
            emb = emb + self.pooled_embed(self._with_time_ids(pooled, time_ids))
        emb = self.add_scalar_conditions(emb, x, step_size=step_size, guidance_scale=guidance_scale)
        emb = emb.to(x.dtype) if emb.dtype != x.dtype else emb
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        if hint is not None:
            h = h + hint.to(h.dtype)
        hs = [h]
        for i, block in enumerate(self.down):
            h = self.run_block(f"down.{i}", self._run, block, h, emb, context, context_mask)
            hs.append(h)
        h = self.run_block("mid", self._run, self.mid, h, emb, context, context_mask)
        return hs, h, emb

    def _with_time_ids(self, pooled: Tensor, time_ids: Tensor | None) -> Tensor:
        """SDXL's added embedding input: the pooled text beside the sinusoidal features of its size
        and crop numbers (Podell et al. 2023)."""
        c = self.config
        if not c.pooled_time_ids:
            return pooled
        if time_ids is None or time_ids.shape != (pooled.shape[0], c.pooled_time_ids):
            raise ValueError(f"this U-Net embeds {c.pooled_time_ids} size/crop numbers per image beside the pooled "
                             f"text: pass time_ids of shape ({pooled.shape[0]}, {c.pooled_time_ids}), got "
                             f"{None if time_ids is None else tuple(time_ids.shape)}")
        feats = sinusoidal_embedding(time_ids.flatten(), c.pooled_time_dim, cos_first=c.time_cos_first,
                                     freq_shift=c.time_freq_shift).reshape(pooled.shape[0], -1)
        return torch.cat([pooled, feats.to(pooled.dtype)], dim=-1)

    def hint_spec(self) -> tuple[int, int]:
        """(channels, stride over the input) of the hint features :meth:`control_features` takes."""
        return self.config.model_channels, 1

    def control_features(self, x: Tensor, t: Tensor, hint: Tensor, **cond: Any) -> dict[str, Tensor]:
        """The features at every residual point with ``hint`` added after the input convolution."""
        hs, h, _ = self.encode(x, t, hint=hint, **cond)
        return {**{f"skip.{i}": s for i, s in enumerate(hs)}, "middle": h}

    def residual_widths(self) -> dict[str, int]:
        """The channels of each residual point (what a ControlNet's zero convolutions output)."""
        return {**{f"skip.{i}": w for i, w in enumerate(self.skip_widths)}, "middle": self.skip_widths[-1]}

    def encoder_copy(self, blocks: int | None = None) -> UNet:
        """A trainable copy of the embeddings, input convolution, down blocks and middle, without the
        decoder: ControlNet's copy (Zhang et al. 2023); only :meth:`encode` runs on it. (``blocks``:
        the whole encoder is copied, as ControlNet does.)"""
        if blocks is not None:
            raise ValueError("a U-Net ControlNet copies the whole encoder; blocks= is for DiTs")
        twin = UNet(self.config)
        twin.up, twin.norm_out, twin.conv_out = nn.ModuleList(), nn.Identity(), nn.Identity()
        own = self.state_dict()
        twin.load_state_dict({k: v for k, v in own.items() if k in twin.state_dict()})
        twin.encoder_only = True
        return twin.to(next(self.parameters()).device)

    def _run(self, block: nn.ModuleList, h: Tensor, emb: Tensor, context, context_mask) -> Tensor:
        def fn(h: Tensor, emb: Tensor) -> Tensor:
            for layer in block:
                if isinstance(layer, ResBlock):
                    h = layer(h, emb)
                elif isinstance(layer, SpatialTransformer):
                    h = layer(h, context, context_mask)
                else:
                    h = layer(h)
            return h

        return checkpointed(fn, self.config.gradient_checkpointing and self.training, h, emb)
