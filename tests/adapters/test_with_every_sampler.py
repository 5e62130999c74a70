"""Every adapter with every sampler and every guidance method, on a tiny text-conditional U-Net:
a LoRA at run time samples what its merged weights sample; a ControlNet and an image prompt at
scale 0 sample the base model exactly, and at scale 1 something else, the same for the same seed."""

import pytest
import torch
from tests.conftest import randomise

import difflab
from difflab import guidance, processes
from difflab.adapters import Control, Controlled, ControlNet, ImagePromptAdapter, ImagePrompted, LoRA, WithLoRA, merge
from difflab.models import UNet, UNetConfig

UNCOND = {"context": torch.zeros(1, 3, 12), "context_mask": torch.ones(1, 3, dtype=torch.bool)}


def _net(seed):
    return randomise(UNet(UNetConfig(in_channels=2, model_channels=16, channel_mult=(1,), num_res_blocks=1,
                                     attention_levels=(0,), head_dim=8, norm_groups=8, context_dim=12)).eval(), seed)


def _guided(den, method, weak):
    if method == "none":
        return den
    options = {"cfg": {"uncond": UNCOND}, "apg": {"uncond": UNCOND}, "pag": {}, "icg": {},
               "autoguidance": {"weak": weak}}[method]
    return guidance.guide(den, method, scale=2.0, **options)


def _sample(model, name, noise, cond):
    return difflab.sample(model, noise, name, steps=2, cond=cond, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["none", *guidance.available()])
@pytest.mark.parametrize("adapter", ["lora", "controlnet", "image_prompt"])
def test_adapter_with_every_sampler(adapter, method):
    net = _net(0)
    den, weak = difflab.Denoiser(net, processes.Flow(), "flow"), difflab.Denoiser(_net(1), processes.Flow(), "flow")
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 2, 8, 8, generator=g)
    cond = {"context": torch.randn(2, 3, 12, generator=g), "context_mask": torch.ones(2, 3, dtype=torch.bool)}
    torch.manual_seed(3)
    if adapter == "lora":
        lora = randomise(LoRA(net, rank=2, targets=("*.to_q", "*.to_v", "*.conv2")), 4).eval()
    elif adapter == "controlnet":
        cn = randomise(ControlNet(net, 1), 5).eval()
        control = torch.rand(2, 1, 8, 8, generator=g)
    else:
        ip = randomise(ImagePromptAdapter(net, image_channels=2, tokens=2), 6).eval()
        with torch.no_grad():
            tokens = ip.embed(torch.rand(2, 2, 8, 8, generator=g))
    with torch.no_grad():
        for name in difflab.samplers.available():
            base = _sample(_guided(den, method, weak), name, noise, cond)
            if adapter == "lora":
                out = _sample(_guided(WithLoRA(den, [(lora, 0.8)]), method, weak), name, noise, cond)
                with merge(net, [(lora, 0.8)]):
                    merged = _sample(_guided(den, method, weak), name, noise, cond)
                torch.testing.assert_close(out, merged, atol=2e-4, rtol=1e-4, msg=name)
            elif adapter == "controlnet":
                off = _sample(_guided(Controlled(den, Control(cn, control, 0.0)), method, weak), name, noise, cond)
                assert torch.equal(off, base), name
                out = _sample(_guided(Controlled(den, Control(cn, control)), method, weak), name, noise, cond)
            else:
                off = _sample(ImagePrompted(_guided(den, method, weak), ip, tokens, 0.0), name, noise, cond)
                assert torch.equal(off, base), name
                out = _sample(ImagePrompted(_guided(den, method, weak), ip, tokens, 1.0), name, noise, cond)
            assert torch.isfinite(out).all() and not torch.allclose(out, base, atol=1e-4), name
