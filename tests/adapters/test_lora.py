"""LoRA: runtime updates through the hook interface, several at once, exact merge and restore,
files with the base model's identity, and clear errors."""

import pytest
import torch
from tests.conftest import randomise

import difflab
from difflab import processes
from difflab.adapters import LoRA, LoRAError, WithLoRA, applied, merge
from difflab.models import DiT, DiTConfig, UNet, UNetConfig


def _unet(context_dim=12, seed=0):
    net = UNet(UNetConfig(in_channels=2, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                          attention_levels=(0, 1), head_dim=8, norm_groups=8, context_dim=context_dim)).eval()
    return randomise(net, seed)


def _lora(net, seed, **options):
    torch.manual_seed(seed)
    lora = LoRA(net, **options)
    for p in lora.parameters():  # B starts at zero; a trained LoRA's is not
        p.data.normal_(0, 0.2)
    return lora.eval()


def _inputs(n=3):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(n, 2, 8, 8, generator=g), torch.rand(n, generator=g) * 1000,
            {"context": torch.randn(n, 4, 12, generator=g), "context_mask": torch.ones(n, 4, dtype=torch.bool)})


def test_a_fresh_lora_is_the_base_model_and_targets_the_attention_projections():
    net = _unet()
    lora = LoRA(net, rank=2)
    assert lora.layers and all(name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "to_out") for name in lora.layers)
    assert len(lora.layers) == 4 * len(net.attention_names())
    x, t, cond = _inputs()
    with torch.no_grad():
        base = net(x, t, **cond)
        with applied(net, lora):
            assert torch.equal(net(x, t, **cond), base)  # B = 0
    share = sum(p.numel() for p in lora.parameters()) / net.num_parameters()
    assert share < 0.05
    convs = LoRA(net, rank=2, targets=("*.conv1",))
    assert convs.layers and all(name.endswith("conv1") for name in convs.layers)


def test_runtime_update_is_the_low_rank_product_and_two_loras_add():
    net = _unet()
    a, b = _lora(net, 1, rank=3, alpha=6.0), _lora(net, 2, rank=2, targets=("*.to_q", "*.conv1"))
    x, t, cond = _inputs()
    with torch.no_grad():
        base = net(x, t, **cond)
        layer = net.weight_layers()[a.layers[0]]
        probe = torch.randn(5, layer.in_features)
        delta = a.weight_delta(a.layers[0])
        torch.testing.assert_close(a.update(a.layers[0], probe), probe @ delta.T, atol=1e-5, rtol=1e-5)
        assert a.scaling(a.layers[0]) == 2.0
        with applied(net, [(a, 0.7), (b, -0.4)]):
            runtime = net(x, t, **cond)
        with merge(net, [(a, 0.7), (b, -0.4)]):
            merged = net(x, t, **cond)
        with applied(net, [(a, 0.7)]), applied(net, [(b, -0.4)]):  # nested: the same sum
            nested = net(x, t, **cond)
    assert not torch.allclose(runtime, base, atol=1e-3)
    torch.testing.assert_close(merged, runtime, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(nested, runtime, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        assert torch.equal(net(x, t, **cond), base)  # nothing left installed, weights restored


def test_merge_then_restore_is_bit_exact_for_every_weight():
    net = _unet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lora = _lora(net, 3, rank=4, targets=("*.to_q", "*.to_v", "*.conv1", "*.emb"))
    handle = merge(net, [(lora, 1.3)])
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(lora.layers)
    handle.restore()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(v.stride() == before[k].stride() for k, v in net.state_dict().items())  # channels-last kept


def test_lora_on_a_dit_and_in_training_mode_dropout():
    net = randomise(DiT(DiTConfig(in_channels=2, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                                  context_dim=12)).eval())
    lora = _lora(net, 4, rank=2, dropout=0.5)
    x, t, cond = _inputs()
    with torch.no_grad(), applied(net, lora):
        evaluated = net(x, t, **cond)
        lora.train()
        torch.manual_seed(0)
        dropped = net(x, t, **cond)
        lora.eval()
    assert not torch.allclose(evaluated, dropped)


@pytest.mark.parametrize("guide", ["none", "cfg", "pag"])
def test_sampling_with_loras_equals_sampling_the_merged_weights(guide):
    from difflab import guidance

    net = _unet()
    den = difflab.Denoiser(net, processes.Flow(), "flow")
    a, b = _lora(net, 1), _lora(net, 2, rank=2)
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    _, _, cond = _inputs(2)
    uncond = {"context": torch.zeros(1, 4, 12), "context_mask": torch.ones(1, 4, dtype=torch.bool)}

    def guided(d):
        if guide == "none":
            return d
        return guidance.guide(d, guide, scale=2.0, **({"uncond": uncond} if guide == "cfg" else {}))

    with torch.no_grad():
        runtime = difflab.sample(guided(WithLoRA(den, [(a, 0.5), (b, 1.0)])), noise, "dpmpp_2m", 4, cond=cond)
        with merge(net, [(a, 0.5), (b, 1.0)]):
            merged = difflab.sample(guided(den), noise, "dpmpp_2m", 4, cond=cond)
        plain = difflab.sample(guided(den), noise, "dpmpp_2m", 4, cond=cond)
    torch.testing.assert_close(runtime, merged, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(runtime, plain, atol=1e-3)


def test_files_keep_the_base_identity_and_bad_loras_are_refused(tmp_path):
    net = _unet()
    lora = _lora(net, 1, rank=3, alpha=1.5, targets=("*.to_k", "*.conv1"))
    lora.save_pretrained(tmp_path / "lora", base_identity="base123")
    again = LoRA.from_pretrained(tmp_path / "lora", net, base_identity="base123")
    assert again.layers == lora.layers and again.alpha == 1.5  # in its order
    assert all(torch.equal(x, y) for x, y in zip(lora.state_dict().values(), again.state_dict().values(), strict=True))
    with pytest.raises(LoRAError, match=r"another model.*allow_other_base"):
        LoRA.from_pretrained(tmp_path / "lora", net, base_identity="other")
    assert LoRA.from_pretrained(tmp_path / "lora", net, base_identity="other", allow_other_base=True).layers
    other = UNet(UNetConfig(in_channels=2, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                            attention_levels=(0, 1), head_dim=8, norm_groups=8, context_dim=12))
    with pytest.raises(LoRAError, match="does not fit"):
        LoRA.from_pretrained(tmp_path / "lora", other)
    with pytest.raises(LoRAError, match="does not fit"):
        with applied(other, lora):
            pass
    tensors = {f"{n}.lora_{p}.weight": torch.zeros(2, 2) for n in ("down.0.1.nope", "up.9.x") for p in "AB"}
    with pytest.raises(LoRAError, match=r"unmatched \['down.0.1.nope', 'up.9.x'\]"):
        LoRA.from_tensors(net, tensors)
    with pytest.raises(LoRAError, match=r"no layer .* matches"):
        LoRA(net, targets=("*.nothing",))
    with pytest.raises(LoRAError, match="rank"):
        LoRA(net, rank=0)
    with pytest.raises(LoRAError, match="no difflab LoRA"):
        LoRA.from_pretrained(tmp_path, net)
