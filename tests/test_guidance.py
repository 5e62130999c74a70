from types import SimpleNamespace

import pytest
import torch

import difflab
from difflab import guidance, processes
from difflab.analytic import GaussianMixture
from difflab.guidance import APG, CFG, ICG, PAG, Autoguidance

PROCESSES = {"flow": processes.Flow, "vp": processes.DiscreteVP.scaled_linear, "edm": processes.EDM}


@pytest.fixture(params=sorted(PROCESSES))
def setup(request):
    mix = GaussianMixture.ring(num_components=8, radius=1.0, std=0.15, num_classes=4)
    proc = PROCESSES[request.param]()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = torch.full((64,), 0.6, dtype=torch.float64)
    labels = torch.arange(64) % 4
    den = mix.denoiser(proc, "x0" if request.param != "vp" else "eps")
    return SimpleNamespace(mix=mix, proc=proc, den=den, x=x, t=t, labels=labels)


def test_cfg_is_the_combination_of_the_exact_denoisers(setup):
    den, x, t, labels = setup.den, setup.x, setup.t, setup.labels
    d_c, d_u = den(x, t, class_labels=labels), den(x, t, class_labels=torch.full_like(labels, -1))
    assert not torch.allclose(d_c, d_u)
    torch.testing.assert_close(CFG(den, 1.0)(x, t, class_labels=labels), d_c, rtol=0, atol=0)
    torch.testing.assert_close(CFG(den, 0.0)(x, t, class_labels=labels), d_u)
    torch.testing.assert_close(CFG(den, 3.5)(x, t, class_labels=labels), d_u + 3.5 * (d_c - d_u))


def test_rescale_keeps_the_conditional_standard_deviation(setup):
    den, x, t, labels = setup.den, setup.x, setup.t, setup.labels
    d_c = den(x, t, class_labels=labels)
    full = CFG(den, 7.0, rescale=1.0)(x, t, class_labels=labels)
    torch.testing.assert_close(full.std(1), d_c.std(1))
    plain = CFG(den, 7.0)(x, t, class_labels=labels)
    half = CFG(den, 7.0, rescale=0.5)(x, t, class_labels=labels)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)


def test_interval_guidance_is_the_conditional_denoiser_outside_its_interval(setup):
    den, x, labels, proc = setup.den, setup.x, setup.labels, setup.proc
    lo, hi = 0.5, 3.0  # EDM noise levels sigma / alpha
    calls = []
    counted = difflab.Denoiser.from_fn(lambda *a, **k: calls.append(1) or den.net(*a, **k), proc, den.prediction,
                                       time="t")
    guided = CFG(counted, 4.0, interval=(lo, hi))
    for tt in (0.02, 0.3, 0.6, 0.9, 0.999):
        tv = torch.full((64,), tt, dtype=torch.float64)
        level = float(proc.sigma(tv[0]) / proc.alpha(tv[0])) if float(proc.alpha(tv[0])) > 0 else float("inf")
        calls.clear()
        out = guided(x, tv, class_labels=labels)
        if lo < level <= hi:
            torch.testing.assert_close(out, CFG(den, 4.0)(x, tv, class_labels=labels))
        else:
            torch.testing.assert_close(out, den(x, tv, class_labels=labels), rtol=0, atol=0)
            assert len(calls) == 1  # outside the interval the unconditional branch is not evaluated
    mixed = torch.tensor([0.02, 0.6] * 32, dtype=torch.float64)  # per-sample times, half inside
    out = guided(x, mixed, class_labels=labels)
    inside = guided.active(mixed)
    assert inside.any() and not inside.all()
    torch.testing.assert_close(out[~inside], den(x, mixed, class_labels=labels)[~inside])


def test_apg_decomposes_the_update(setup):
    den, x, t, labels = setup.den, setup.x, setup.t, setup.labels
    d_c = den(x, t, class_labels=labels)
    torch.testing.assert_close(APG(den, 5.0, eta=1.0)(x, t, class_labels=labels),
                               CFG(den, 5.0)(x, t, class_labels=labels))
    ortho = APG(den, 5.0, eta=0.0)(x, t, class_labels=labels) - d_c
    assert (ortho * d_c).sum(1).abs().max() < 1e-10  # only the part orthogonal to D_c is added
    capped = APG(den, 5.0, eta=1.0, norm_threshold=0.01)(x, t, class_labels=labels) - d_c
    assert capped.norm(dim=1).max() <= 4 * 0.01 + 1e-9


def test_autoguidance_with_itself_is_the_model_and_a_weak_model_sharpens(setup):
    den, x, t, labels = setup.den, setup.x, setup.t, setup.labels
    torch.testing.assert_close(Autoguidance(den, den, 3.0)(x, t, class_labels=labels), den(x, t, class_labels=labels))
    mix, proc = setup.mix, setup.proc
    weak_mix = GaussianMixture(mix.log_weights.exp(), mix.means, mix.eigvals * 4, mix.eigvecs, labels=mix.labels)
    weak = weak_mix.denoiser(proc, den.prediction.name)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(400, 2, generator=g, dtype=torch.float64)
    lab = torch.arange(400) % 4
    plain = difflab.sample(den, noise, "dpmpp_2m", steps=20, cond={"class_labels": lab})
    auto = difflab.sample(Autoguidance(den, weak, 2.0), noise, "dpmpp_2m", steps=20, cond={"class_labels": lab})
    dist = lambda s: torch.cdist(s, mix.means).min(1).values.mean()  # noqa: E731
    assert dist(auto) < 0.9 * dist(plain)  # guided by its blurrier self, samples move toward the modes


def _class_accuracy(mix, samples, labels):
    nearest = torch.cdist(samples, mix.means.to(samples.dtype)).argmin(1)
    return float((mix.labels[nearest] == labels).double().mean())


def test_cfg_raises_class_accuracy_over_unguided_sampling():
    mix = GaussianMixture.ring(num_components=8, radius=1.0, std=0.35, num_classes=4)
    proc = processes.Flow()
    den = mix.denoiser(proc, "flow")
    noise = torch.randn(800, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lab = torch.arange(800) % 4
    methods = {"none": den, "cfg": CFG(den, 3.0), "cfg_interval": CFG(den, 3.0, interval=(0.3, 50))}
    acc = {name: _class_accuracy(mix, difflab.sample(d, noise, "dpmpp_2m", steps=15, cond={"class_labels": lab}), lab)
           for name, d in methods.items()}
    assert acc["cfg"] > acc["none"] + 0.05 and acc["cfg_interval"] > acc["none"] + 0.05, acc


def test_icg_uses_an_independent_random_condition(setup):
    den, x, t, labels = setup.den, setup.x, setup.t, setup.labels
    icg = ICG(den, 3.0, num_classes=4, seed=5)
    random = icg.random_condition({"class_labels": labels})["class_labels"]
    assert random.shape == labels.shape and not torch.equal(random, labels)
    d_c, d_r = den(x, t, class_labels=labels), den(x, t, class_labels=random)
    torch.testing.assert_close(icg(x, t, class_labels=labels), d_r + 3.0 * (d_c - d_r))
    with pytest.raises(ValueError, match="num_classes"):
        ICG(den, 3.0)(x, t, class_labels=labels)


def test_icg_feeds_a_network_random_label_embeddings():
    net = _tiny_dit()
    den = difflab.Denoiser(net, processes.Flow(), "flow")
    x, t, lab = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5), torch.tensor([0, 1, 2, 0])
    icg = ICG(den, 2.0, seed=1)
    emb = icg.random_condition({"class_labels": lab})["class_labels"]
    assert emb.shape == (4, net.config.hidden_size) and emb.is_floating_point()
    with torch.no_grad():
        d_c, d_r = den(x, t, class_labels=lab), den(x, t, class_labels=emb)
        torch.testing.assert_close(icg(x, t, class_labels=lab), d_r + 2.0 * (d_c - d_r), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["cfg", "apg", "icg", "autoguidance"])
def test_every_guidance_composes_with_every_sampler(method):
    mix = GaussianMixture.ring(num_components=4, radius=1.0, std=0.2, num_classes=2)
    proc = processes.DiscreteVP.scaled_linear(zero_terminal_snr=True)
    den = mix.denoiser(proc, "v")
    opts = {"num_classes": 2} if method == "icg" else {"weak": den} if method == "autoguidance" else {}
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cond = {"class_labels": torch.arange(8) % 2}
    for name in difflab.samplers.available():
        guided = guidance.guide(den, method, scale=2.0, interval=(0.1, 20.0), **opts)
        a = difflab.sample(guided, noise, name, steps=6, cond=cond, generator=torch.Generator().manual_seed(0))
        b = difflab.sample(guided, noise, name, steps=6, cond=cond, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(a).all() and torch.equal(a, b), name


def _tiny_dit():
    from difflab.models import DiT, DiTConfig

    torch.manual_seed(0)
    net = DiT(DiTConfig(in_channels=1, patch_size=2, hidden_size=32, depth=3, num_heads=2,
                        num_classes=3)).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    return net


def test_pag_perturbs_self_attention_through_the_hook():
    from difflab.models.layers import attention_layers, attention_processor

    net = _tiny_dit()
    den = difflab.Denoiser(net, processes.Flow(), "flow")
    x, t, lab = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5), torch.tensor([0, 1, 2, 0])
    mid = list(attention_layers(net, "self"))[1]

    def identity(attn, h, context, mask, rope):
        return attn.out(attn.qkv(h, context, rope)[2])

    with torch.no_grad():
        d_c = den(x, t, class_labels=lab)
        with attention_processor(net, identity, "self", where=lambda a: a is mid):
            d_p = den(x, t, class_labels=lab)
        out = PAG(den, 2.0)(x, t, class_labels=lab)
        both = PAG(den, 2.0, cfg_scale=3.0)(x, t, class_labels=lab)
        d_u = den(x, t, class_labels=torch.full_like(lab, -1))
    assert not torch.allclose(d_c, d_p, atol=1e-4)
    torch.testing.assert_close(out, d_c + 2.0 * (d_c - d_p), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both, d_c + 2.0 * (d_c - d_p) + 2.0 * (d_c - d_u), atol=1e-5, rtol=1e-5)
    assert all(a.processor.__name__ == "default_processor" for a in attention_layers(net))  # restored


def test_bad_guidance_input_is_refused():
    mix = GaussianMixture.ring(num_components=4, num_classes=2)
    den = mix.denoiser(processes.Flow(), "flow")
    with pytest.raises(ValueError, match="no self-attention"):
        PAG(den, 2.0)
    with pytest.raises(ValueError, match="unknown guidance 'cfgg'"):
        guidance.get("cfgg")
    with pytest.raises(ValueError, match="interval"):
        CFG(den, 2.0, interval=(3.0, 1.0))
    with pytest.raises(ValueError, match="uncond="):
        CFG(den, 2.0)(torch.zeros(2, 2), 0.5, context=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="process"):
        Autoguidance(den, mix.denoiser(processes.EDM(), "x0"))


@pytest.mark.parametrize("method", ["cfg", "apg", "icg", "pag"])
def test_guidance_with_a_text_conditional_network(method):
    from difflab.models import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=2, model_channels=16, channel_mult=(1,), num_res_blocks=1,
                          attention_levels=(0,), head_dim=8, norm_groups=8, context_dim=12)).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    den = difflab.Denoiser(net, processes.Flow(), "flow")
    g = torch.Generator().manual_seed(1)
    cond = {"context": torch.randn(3, 5, 12, generator=g), "context_mask": torch.ones(3, 5, dtype=torch.bool)}
    uncond = {"context": torch.zeros(1, 5, 12), "context_mask": torch.tensor([[True, True, False, False, False]])}
    options = {"uncond": uncond} if method != "icg" else {}
    if method == "pag":
        options["cfg_scale"] = 2.0
    guided = guidance.guide(den, method, scale=3.0, **options)
    noise = torch.randn(3, 2, 8, 8, generator=g)
    with torch.no_grad():
        out = difflab.sample(guided, noise, "unipc", steps=4, cond=cond)
        plain = difflab.sample(den, noise, "unipc", steps=4, cond=cond)
        if method == "cfg":  # the null text branch really is the uncond encoding, batched with the prompt's
            x, t = noise * 0.5, torch.full((3,), 0.5)
            d_c, d_u = den(x, t, **cond), den(x, t, **{k: v.expand(3, *v.shape[1:]) for k, v in uncond.items()})
            torch.testing.assert_close(guided(x, t, **cond), d_u + 3.0 * (d_c - d_u), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain)
