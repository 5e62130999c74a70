"""IP-Adapter: decoupled cross-attention through the hook interface; scale 0 is the base model."""

import pytest
import torch

import difflab
from difflab import guidance, processes
from difflab.adapters import ImagePromptAdapter, ImagePrompted
from difflab.models import UNet, UNetConfig
from difflab.pipeline import Pipeline


def _net(context_dim=12):
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=2, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                          attention_levels=(0, 1), head_dim=8, norm_groups=8, context_dim=context_dim)).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    return net


def test_scale_zero_is_the_base_model_and_the_image_changes_the_output(tmp_path):
    net = _net()
    den = difflab.Denoiser(net, processes.Flow(), "flow")
    adapter = ImagePromptAdapter(net, image_channels=3, tokens=3).eval()
    refs = torch.rand(2, 3, 16, 16) * 2 - 1
    cond = {"context": torch.randn(2, 5, 12), "context_mask": torch.ones(2, 5, dtype=torch.bool)}
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = adapter.embed(refs)
        base = difflab.sample(den, noise, "dpmpp_2m", 5, cond=cond)
        assert torch.equal(difflab.sample(ImagePrompted(den, adapter, tokens, 0.0), noise, "dpmpp_2m", 5, cond=cond),
                           base)
        with_image = difflab.sample(ImagePrompted(den, adapter, tokens, 1.0), noise, "dpmpp_2m", 5, cond=cond)
        assert not torch.allclose(with_image, base, atol=1e-4)
        other = difflab.sample(ImagePrompted(den, adapter, adapter.embed(refs.flip(0)), 1.0), noise, "dpmpp_2m", 5,
                               cond=cond)
        assert not torch.allclose(other, with_image, atol=1e-5)  # another reference, other images
        uncond = {"context": torch.zeros(1, 5, 12), "context_mask": torch.ones(1, 5, dtype=torch.bool)}
        guided = ImagePrompted(guidance.guide(den, "cfg", scale=3.0, uncond=uncond), adapter, tokens, 1.0)
        assert torch.isfinite(difflab.sample(guided, noise, "dpmpp_2m", 5, cond=cond)).all()
    adapter.save_pretrained(tmp_path / "ip", base_identity="abc")
    again = ImagePromptAdapter.from_pretrained(tmp_path / "ip", net, base_identity="abc")
    with torch.no_grad():
        torch.testing.assert_close(again.embed(refs), tokens)
    with pytest.raises(ValueError, match="another model"):
        ImagePromptAdapter.from_pretrained(tmp_path / "ip", net, base_identity="xyz")
    with pytest.raises(ValueError, match="cross-attention"):
        ImagePromptAdapter(UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1,), num_res_blocks=1,
                                           attention_levels=(), norm_groups=8)))


def test_training_changes_only_the_adapter_and_is_deterministic():
    from difflab.training.adapters import train_image_prompt

    net = _net(384)
    pipe = Pipeline(net, processes.Flow(), "flow", sample_shape=(2, 8, 8), steps=3, cond_dropout=0.1,
                    text_encoder={"name": "minilm", "max_tokens": 8})
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.rand(6, 2, 8, 8) * 2 - 1
    prompts = ["a red circle", "a blue square"] * 3
    a = train_image_prompt(pipe, images, prompts, steps=5, batch_size=4, progress=False)
    b = train_image_prompt(pipe, images, prompts, steps=5, batch_size=4, progress=False)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    torch.manual_seed(0)  # the initial adapter training starts from
    fresh = ImagePromptAdapter(net, image_channels=2)
    assert not torch.equal(fresh.project.weight, a.project.weight)
    out = pipe(2, prompts=prompts[:2], image_prompt={"adapter": a, "images": images[:2], "scale": 0.7})
    assert out.settings[0]["image_prompt"]["scale"] == 0.7 and torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match="image prompt"):
        pipe.reproduce(out.settings[0])
