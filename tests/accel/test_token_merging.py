"""ToMe through the attention hook: ratio 0 is the plain network bit for bit; merging keeps every
token's output defined, removes the asked-for fraction of tokens from attention, and composes with
samplers and guidance."""

import pytest
import torch

import difflab
from difflab import accel, guidance, processes
from difflab.accel.token_merging import bipartite_merge
from difflab.models import DiT, DiTConfig, UNet, UNetConfig


def _perturbed(net):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


NETS = {
    "unet": lambda: UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_levels=(0, 1), head_dim=8, norm_groups=8, num_classes=3)),
    "dit": lambda: DiT(DiTConfig(in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)),
}
NOISE = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
COND = {"class_labels": torch.tensor([0, 1, 2])}


@pytest.fixture(params=sorted(NETS))
def den(request):
    return difflab.Denoiser(_perturbed(NETS[request.param]()), processes.Flow(), "flow")


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun"])
def test_ratio_zero_is_the_plain_network(den, sampler):
    with torch.no_grad():
        plain = difflab.sample(den, NOISE, sampler, steps=4, cond=COND)
        with accel.token_merging(den, ratio=0.0) as fast:
            assert torch.equal(difflab.sample(fast, NOISE, sampler, steps=4, cond=COND), plain)


def test_merging_removes_tokens_and_unmerges_every_token():
    x = torch.randn(2, 16, 8)
    x[:, 1], x[:, 2], x[:, 5] = x[:, 0], x[:, 0], x[:, 4]  # sources equal to a destination (0 and 4 are ones)
    merged, slot = bipartite_merge(x, r=3)
    assert merged.shape == (2, 13, 8)
    torch.testing.assert_close(merged.gather(1, slot[..., None].expand(-1, -1, 8)), x)  # identical tokens merge exactly
    assert slot.max() < 13 and slot.min() >= 0


def test_merging_attends_fewer_tokens_and_composes_with_guidance(den):
    with torch.no_grad():
        _, full = accel.count_flops(lambda: difflab.sample(den, NOISE, "dpmpp_2m", steps=3, cond=COND))
        with accel.token_merging(den, ratio=0.5) as fast:
            out, merged = accel.count_flops(lambda: difflab.sample(fast, NOISE, "dpmpp_2m", steps=3, cond=COND))
            guided = difflab.sample(guidance.guide(fast, "cfg", scale=2.0), NOISE, "dpmpp_2m", steps=3, cond=COND)
            perturbed = difflab.sample(guidance.guide(fast, "pag", scale=2.0), NOISE, "dpmpp_2m", steps=3, cond=COND)
    assert merged < full and torch.isfinite(out).all() and torch.isfinite(guided).all()
    assert torch.isfinite(perturbed).all()
    report = fast.report
    assert report["tokens_attended"] < report["tokens_in"]
    with pytest.raises(ValueError, match=r"ratio must lie in \[0, 1\)"):
        with accel.token_merging(den, ratio=1.0):
            pass
