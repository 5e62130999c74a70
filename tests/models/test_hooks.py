"""The network hook interface (difflab.hooks.Hookable) on every network kind."""

import pytest
import torch

from difflab import hooks
from difflab.models import MLP, DiT, DiTConfig, MLPConfig, MMDiT, MMDiTConfig, UNet, UNetConfig


def _perturb(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def _unet():
    return UNet(UNetConfig(in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_levels=(1,), head_dim=8, norm_groups=8, num_classes=5, context_dim=12))


def _dit():
    return DiT(DiTConfig(in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=5,
                         context_dim=12))


def _mlp():
    return MLP(MLPConfig(dim=3, hidden=32, depth=3, num_classes=5))


def _mmdit():
    return MMDiT(MMDiTConfig(in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=2, context_dim=12,
                             pooled_dim=6, position_grid=4, sincos_base=4, qk_norm=True, dual_attention=(1,)))


NETS = {"unet": _unet, "dit": _dit, "mlp": _mlp, "mmdit": _mmdit}


def _inputs(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3) if kind == "mlp" else torch.randn(2, 3, 8, 8, generator=g)
    cond = {} if kind == "mmdit" else {"class_labels": torch.tensor([1, 3])}
    if kind != "mlp":
        cond["context"] = torch.randn(2, 4, 12, generator=g)
    if kind == "mmdit":  # text tokens and the pooled text embedding, no classes
        cond["pooled"] = torch.randn(2, 6, generator=g)
    return x, torch.tensor([0.3, 0.7]), cond


@pytest.fixture(params=sorted(NETS))
def net(request):
    return request.param, _perturb(NETS[request.param]())


def test_every_network_is_hookable_with_named_blocks_in_order(net):
    kind, model = net
    assert isinstance(model, hooks.Hookable)
    x, t, cond = _inputs(kind)
    seen = []

    def observe(name, compute, inputs):
        seen.append(name)
        return compute()

    with torch.no_grad():
        plain = model(x, t, **cond)
        with model.hook_blocks(dict.fromkeys(model.block_names(), observe)):
            observed = model(x, t, **cond)
    assert seen == model.block_names() and len(seen) >= 3
    assert torch.equal(plain, observed)  # a hook that only observes changes nothing
    assert "_block_hooks" not in model.__dict__ or not model.__dict__["_block_hooks"]  # nothing left behind


def test_a_block_hook_can_replace_or_skip_its_block(net):
    kind, model = net
    x, t, cond = _inputs(kind)
    name = model.block_names()[1]
    saved, calls = {}, []

    def record(name, compute, inputs):
        saved["out"] = compute()
        return saved["out"]

    def skip(name, compute, inputs):  # a cache: the saved output without running the block
        calls.append(name)
        return saved["out"]

    with torch.no_grad():
        plain = model(x, t, **cond)
        with model.hook_blocks({name: record}):
            model(x, t, **cond)
        with model.hook_blocks({name: skip}):
            cached = model(x, t, **cond)
        with model.hook_blocks({name: lambda n, compute, inputs: compute() * 0}):
            zeroed = model(x, t, **cond)
    assert calls == [name] and torch.equal(plain, cached)
    assert not torch.allclose(plain, zeroed)
    with pytest.raises(ValueError, match="has no block"):
        with model.hook_blocks({"nowhere": record}):
            pass


def test_residual_points_add_to_the_output_path(net):
    kind, model = net
    x, t, cond = _inputs(kind)
    points = model.residual_points()
    assert points
    with torch.no_grad():
        plain = model(x, t, **cond)
        shapes = {}

        def shape_of(name, compute, inputs):
            out = compute()
            shapes[name] = out.shape
            return out

        with model.hook_blocks(dict.fromkeys(model.block_names(), shape_of)):
            model(x, t, **cond)
        point = points[-1] if kind == "unet" else points[0]  # the U-Net's middle, a block otherwise
        shape = shapes["mid"] if kind == "unet" else shapes[point]
        if kind == "mmdit":  # a block carries image then text tokens; residuals add to the image's
            shape = (shape[0], shape[1] - cond["context"].shape[1], shape[2])
        zero = model(x, t, **cond, residuals={point: torch.zeros(shape)})
        pushed = model(x, t, **cond, residuals={point: torch.randn(shape, generator=torch.Generator().manual_seed(3))})
    assert torch.equal(plain, zero) and not torch.allclose(plain, pushed)
    with pytest.raises(ValueError, match="residual points are"):
        model(x, t, **cond, residuals={"nowhere": torch.zeros(1)})


def test_class_embeddings_given_directly_equal_their_labels(net):
    kind, model = net
    if kind == "mmdit":
        assert model.class_embedding_table() is None  # text-only: no label embedding
        return
    x, t, cond = _inputs(kind)
    table = model.class_embedding_table()
    assert table.shape[0] == 6  # 5 classes and the null class
    with torch.no_grad():
        by_label = model(x, t, **cond)
        by_embedding = model(x, t, **{**cond, "class_labels": model.embed_class_labels(cond["class_labels"])})
    assert torch.equal(by_label, by_embedding)


def test_attention_layers_are_named_by_block_and_kind():
    model = _perturb(_unet())
    selfs, crosses = model.attention_names("self"), model.attention_names("cross")
    assert selfs and crosses and not set(selfs) & set(crosses)
    assert all(name.split("/")[0] in model.block_names() for name in selfs + crosses)
    x, t, cond = _inputs("unet")

    def zero_attention(attn, h, context, mask, rope):
        return torch.zeros_like(h)

    with torch.no_grad():
        plain = model(x, t, **cond)
        with model.hook_attention(zero_attention, "cross", [crosses[0]]) as count:
            changed = model(x, t, **cond)
        again = model(x, t, **cond)
    assert count == 1 and not torch.allclose(plain, changed) and torch.equal(plain, again)
    with pytest.raises(ValueError, match="no self attention layer"):
        with model.hook_attention(zero_attention, "self", ["mid/99"]):
            pass


def test_joint_attention_is_hooked_as_self_attention_over_both_streams():
    """An MMDiT's joint attention runs through the same processor protocol: a processor that
    zeroes its output changes the image, the default one restored gives the same output."""
    model = _perturb(_mmdit())
    names = model.attention_names("self")
    assert len(names) == 4 and not model.attention_names("cross")  # three joint layers, one image-only
    x, t, cond = _inputs("mmdit")
    seen = []

    def zero_attention(attn, h, context, mask, rope):
        q, _, v = attn.qkv(h, context, rope)
        seen.append(q.shape[2])
        return attn.out(torch.zeros_like(v))

    with torch.no_grad():
        plain = model(x, t, **cond)
        with model.hook_attention(zero_attention, "self", [names[0]]):
            changed = model(x, t, **cond)
        again = model(x, t, **cond)
    assert seen == [16 + 4] and not torch.allclose(plain, changed) and torch.equal(plain, again)


def test_network_of_finds_the_network_behind_wrappers():
    from difflab import Denoiser, guidance, processes

    model = _perturb(_mlp())
    den = Denoiser(model, processes.Flow(), "flow")
    assert hooks.network_of(den) is model
    assert hooks.network_of(guidance.guide(den, "cfg", scale=2.0)) is model
    assert hooks.network_of(Denoiser.from_fn(lambda x, t: x, processes.Flow(), "x0")) is None
