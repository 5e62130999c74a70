import time

import pytest
import torch
import torch.nn.functional as F

from difflab import models
from difflab.models import MLP, DiT, DiTConfig, MLPConfig, UNet, UNetConfig, layers
from difflab.models.layers import (
    Attention,
    FeedForward,
    attention_processor,
    default_processor,
    set_processor,
)


def tiny_unet(**kw):
    cfg = dict(in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
               head_dim=16, norm_groups=8)
    cfg.update(kw)
    return UNet(UNetConfig(**cfg))


def tiny_dit(**kw):
    cfg = dict(in_channels=4, patch_size=2, hidden_size=64, depth=4, num_heads=4)
    cfg.update(kw)
    return DiT(DiTConfig(**cfg))


def _perturb(model, scale=0.05, seed=0):
    """Move zero-initialised parameters off zero so that conditioning paths are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("channels", [3, 4])  # pixels and latents
def test_unet_shapes_and_zero_output_at_init(channels):
    net = tiny_unet(in_channels=channels)
    x = torch.randn(2, channels, 16, 24)
    out = net(x, torch.tensor([1.0, 500.0]))
    assert out.shape == x.shape and float(out.detach().abs().max()) == 0.0


@pytest.mark.parametrize("conditioning", ["adaln_zero", "adaln_single", "in_context"])
@pytest.mark.parametrize("position", ["sincos", "rope"])
def test_dit_shapes_any_size_and_zero_output(conditioning, position):
    ctx = 16 if conditioning != "adaln_zero" else None
    net = tiny_dit(conditioning=conditioning, position=position, context_dim=ctx, num_classes=5, long_skip=True,
                   qk_norm=True)
    for h, w in [(8, 8), (12, 6)]:
        x = torch.randn(2, 4, h, w)
        context = torch.randn(2, 7, 16) if ctx else None
        out = net(x, 10.0, class_labels=torch.tensor([0, -1]), context=context)
        assert out.shape == x.shape and float(out.detach().abs().max()) == 0.0


def test_conditioning_changes_output_and_null_condition_works():
    unet = _perturb(tiny_unet(num_classes=4, context_dim=8))
    dit = _perturb(tiny_dit(num_classes=4, context_dim=8, conditioning="adaln_single"))
    for net, x in [(unet, torch.randn(2, 3, 8, 8)), (dit, torch.randn(2, 4, 8, 8))]:
        ctx = torch.randn(2, 5, 8)
        a = net(x, 100.0, class_labels=torch.tensor([1, 1]), context=ctx)
        b = net(x, 100.0, class_labels=torch.tensor([2, 2]), context=ctx)
        null = net(x, 100.0, class_labels=torch.tensor([-1, -1]), context=torch.zeros_like(ctx))
        c = net(x, 100.0, class_labels=torch.tensor([1, 1]), context=torch.randn(2, 5, 8))
        assert not torch.allclose(a, b) and not torch.allclose(a, c) and torch.isfinite(null).all()
    mlp = _perturb(MLP(MLPConfig(dim=2, num_classes=3)))
    x = torch.randn(4, 2)
    assert not torch.allclose(mlp(x, 5.0, class_labels=torch.zeros(4, dtype=torch.long)),
                              mlp(x, 5.0, class_labels=torch.full((4,), -1)))


def test_attention_hook_replaces_and_observes():
    net = _perturb(tiny_dit(depth=2))
    x = torch.randn(2, 4, 8, 8)
    base = net(x, 10.0)
    maps = []

    def observe(attn: Attention, h, context, mask, rope):
        q, k, v = attn.qkv(h, context, rope)
        weights = torch.softmax(q @ k.transpose(-1, -2) / attn.head_dim**0.5, dim=-1)
        maps.append(weights)
        return attn.out(weights @ v)

    with attention_processor(net, observe, kind="self") as n:
        observed = net(x, 10.0)
    assert n == 2 and len(maps) == 2 and maps[0].shape == (2, 4, 16, 16)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 16))
    torch.testing.assert_close(observed, base, atol=1e-5, rtol=1e-5)  # observing changes nothing

    def identity(attn, h, context, mask, rope):  # PAG: the attention map becomes the identity
        _, _, v = attn.qkv(h, context, rope)
        return attn.out(v)

    with attention_processor(net, identity, kind="self"):
        perturbed = net(x, 10.0)
    assert not torch.allclose(perturbed, base)
    torch.testing.assert_close(net(x, 10.0), base)  # restored on exit
    assert set_processor(net, None) == 2
    assert all(a.processor is default_processor for a in net.modules() if isinstance(a, Attention))
    with pytest.raises(ValueError, match="no cross attention"):
        with attention_processor(net, identity, kind="cross"):
            pass


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit, lambda: MLP(MLPConfig(dim=3, num_classes=2))])
def test_config_round_trip_rebuilds_identical_weights(make, tmp_path):
    net = _perturb(make())
    net.save_pretrained(tmp_path / "net")
    rebuilt = models.Network.from_pretrained(tmp_path / "net")
    assert type(rebuilt) is type(net)
    assert rebuilt.to_config() == net.to_config() and rebuilt.num_parameters() == net.num_parameters()
    for key, value in net.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key])
    with pytest.raises(ValueError, match="unknown field"):
        type(net).from_config({**net.to_config(), "widht": 3})
    assert not list((tmp_path / "net").glob("*.tmp"))


def test_weights_from_another_config_are_refused_by_name(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "a")
    import json

    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["model_channels"] = 16
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="wrong shapes"):
        models.Network.from_pretrained(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no saved network"):
        models.Network.from_pretrained(tmp_path / "nothing")


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = _perturb(tiny_unet())
    b = tiny_unet(gradient_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 8, 8)
    for net in (a, b):
        net.train()
        net(x, 10.0).pow(2).mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_bad_inputs_are_named():
    unet = tiny_unet(num_classes=3, context_dim=8)
    with pytest.raises(ValueError, match=r"expects \(batch, 3"):
        unet(torch.randn(1, 4, 8, 8), 1.0, class_labels=torch.tensor([0]), context=torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor"):
        unet(torch.randn(1, 3, 9, 8), 1.0, class_labels=torch.tensor([0]), context=torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="class_labels"):
        unet(torch.randn(1, 3, 8, 8), 1.0, context=torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="context"):
        unet(torch.randn(1, 3, 8, 8), 1.0, class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="patch size 2"):
        tiny_dit()(torch.randn(1, 4, 7, 8), 1.0)
    with pytest.raises(ValueError, match="null class"):
        tiny_dit(num_classes=3)(torch.randn(1, 4, 8, 8), 1.0, class_labels=torch.tensor([7]))
    with pytest.raises(ValueError, match="conditioning"):
        tiny_dit(conditioning="film")


def test_feed_forward_inference_path_equals_the_training_path():
    """The fused oneDNN linear+GELU used for CPU inference agrees with the autograd path."""
    torch.manual_seed(0)
    ff = FeedForward(16)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        fast = ff(x)
    slow = ff(x)  # parameters require grad: the unfused path
    assert slow.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)
    reference = ff.proj_out(F.gelu(ff.proj_in(x), approximate="tanh"))
    torch.testing.assert_close(slow, reference)
    if layers._mkldnn_linear_gelu_works():  # where the build has the op, inference does use it
        with torch.no_grad(), torch.profiler.profile() as prof:
            ff(x)
        assert any("_linear_pointwise" in e.key for e in prof.key_averages())


def test_compiles_without_graph_breaks():
    net = tiny_dit(num_classes=3)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(compiled(x, torch.tensor([3.0, 4.0]), class_labels=torch.tensor([0, 1])),
                               net(x, torch.tensor([3.0, 4.0]), class_labels=torch.tensor([0, 1])))


def _overfit(net, x, steps, **cond):
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    t = torch.linspace(10, 900, x.shape[0])
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(net(x, t, **cond), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_small_networks_overfit_a_handful_of_examples(kind):
    torch.manual_seed(0)
    start = time.time()
    if kind == "unet":
        net, x = tiny_unet(num_classes=2), torch.randn(4, 3, 8, 8)
        losses = _overfit(net, x, 150, class_labels=torch.tensor([0, 1, 0, 1]))
    else:
        net, x = tiny_dit(num_classes=2), torch.randn(4, 4, 8, 8)
        losses = _overfit(net, x, 150, class_labels=torch.tensor([0, 1, 0, 1]))
    assert losses[-1] < losses[0] / 10, losses[::25]
    assert time.time() - start < 60


def test_the_attention_block_is_adm_s_and_starts_as_identity():
    """x + attn(norm(x)) (Dhariwal & Nichol 2021); the old block added norm(x) as well."""
    from difflab.models.conv_blocks import SpatialTransformer

    block = SpatialTransformer(16, 2, groups=4).eval()
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(block(x), x)  # zero-initialised output projection
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
        attn = block.blocks[0]["attn1"]
        tokens = block.norm(x).flatten(2).transpose(1, 2)
        expected = x + attn(tokens).transpose(1, 2).reshape(x.shape)
        torch.testing.assert_close(block(x), expected)
