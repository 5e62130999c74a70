"""ControlNet: zero-initialised residuals into the frozen U-Net, scale, step window, several controls,
control kept on both guidance branches, files, and clear errors."""

import pytest
import torch
from tests.conftest import randomise

import difflab
from difflab import guidance, processes
from difflab.adapters import Control, ControlError, Controlled, ControlNet
from difflab.models import UNet, UNetConfig


def _unet(**options):
    net = UNet(UNetConfig(in_channels=2, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                          attention_levels=(1,), head_dim=8, norm_groups=8, context_dim=12, **options)).eval()
    return randomise(net)


def _controlnet(net, channels=1, downscale=2, seed=1, trained=True):
    torch.manual_seed(seed)
    cn = ControlNet(net, channels, downscale=downscale)
    if trained:  # the zero convolutions of a trained ControlNet are not zero
        for name, p in cn.named_parameters():
            if name.startswith(("zero", "hint.body.6")):
                p.data.normal_(0, 0.1)
    return cn.eval()


def _cond(n=2):
    g = torch.Generator().manual_seed(3)
    return {"context": torch.randn(n, 4, 12, generator=g), "context_mask": torch.ones(n, 4, dtype=torch.bool)}


def test_a_fresh_controlnet_is_the_base_model_and_the_copy_is_the_encoder():
    net = _unet()
    den = difflab.Denoiser(net, processes.Flow(), "flow")
    cn = _controlnet(net, trained=False)
    assert set(cn.points) == set(net.residual_points())
    own = net.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in cn.copy.state_dict().items())  # a copy of the encoder's weights
    assert not any(k.startswith(("copy.up", "copy.conv_out")) for k in cn.state_dict())
    x, control = torch.randn(2, 2, 8, 8), torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(Controlled(den, Control(cn, control))(x, 0.5, **_cond()), den(x, 0.5, **_cond()))
    with pytest.raises(ValueError, match="encoder copy"):
        cn.copy(x, torch.zeros(2), **_cond())


def test_residuals_scale_window_and_several_controls_add():
    net = _unet()
    den = difflab.Denoiser(net, processes.Flow(), "flow")
    mask, edges = _controlnet(net, 1, seed=1), _controlnet(net, 3, seed=2)
    x, cond = torch.randn(2, 2, 8, 8), _cond()
    m_img, e_img = torch.rand(2, 1, 16, 16), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        x_in, time = den.network_inputs(x, torch.full((2,), 0.6))
        r_m, r_e = mask(x_in, time, m_img, **cond), edges(x_in, time, e_img, **cond)
        both = Controlled(den, [Control(mask, m_img, 0.8), Control(edges, e_img, 0.5)])(x, 0.6, **cond)
        by_hand = den(x, 0.6, residuals={k: 0.8 * r_m[k] + 0.5 * r_e[k] for k in r_m}, **cond)
        torch.testing.assert_close(both, by_hand, atol=1e-6, rtol=1e-6)
        one = Controlled(den, Control(mask, m_img, 0.8))(x, 0.6, **cond)
        assert not torch.allclose(one, den(x, 0.6, **cond), atol=1e-4)
        assert not torch.allclose(both, one, atol=1e-4)
        nested = Controlled(Controlled(den, Control(edges, e_img, 0.5)), Control(mask, m_img, 0.8))(x, 0.6, **cond)
        torch.testing.assert_close(nested, both, atol=1e-6, rtol=1e-6)
        # only within its window: t = 0.6 lies outside [0, 0.5], so the control is off there
        windowed = Controlled(den, Control(mask, m_img, 0.8, start=0.5))
        assert torch.equal(windowed(x, 0.6, **cond), den(x, 0.6, **cond))
        ts = torch.tensor([0.6, 0.3])
        per_sample = windowed(x, ts, **cond)  # one sample inside the window, one outside
        assert torch.equal(per_sample[0], den(x, ts, **cond)[0])
        torch.testing.assert_close(per_sample[1], Controlled(den, Control(mask, m_img, 0.8))(x, ts, **cond)[1])


def test_guidance_keeps_the_control_on_both_branches():
    net = _unet()
    den = difflab.Denoiser(net, processes.Flow(), "flow")
    cn = _controlnet(net)
    x, cond, control = torch.randn(2, 2, 8, 8), _cond(), torch.rand(2, 1, 16, 16)
    uncond = {"context": torch.zeros(1, 4, 12), "context_mask": torch.ones(1, 4, dtype=torch.bool)}
    controlled = Controlled(den, Control(cn, control))
    with torch.no_grad():
        guided = guidance.guide(controlled, "cfg", scale=3.0, uncond=uncond)(x, 0.5, **cond)
        d_c = controlled(x, 0.5, **cond)
        d_u = controlled(x, 0.5, context=uncond["context"].expand(2, -1, -1),
                         context_mask=uncond["context_mask"].expand(2, -1))
    torch.testing.assert_close(guided, d_u + 3.0 * (d_c - d_u), atol=1e-5, rtol=1e-5)


def test_files_and_bad_input_are_refused_clearly(tmp_path):
    net = _unet()
    cn = _controlnet(net, 4)
    cn.save_pretrained(tmp_path / "cn", base_identity="base1")
    again = ControlNet.from_pretrained(tmp_path / "cn", net, base_identity="base1")
    assert all(torch.equal(a, b) for a, b in zip(cn.state_dict().values(), again.state_dict().values(), strict=True))
    with pytest.raises(ControlError, match="another model"):
        ControlNet.from_pretrained(tmp_path / "cn", net, base_identity="base2")
    wider = _unet(dropout=0.1)
    with pytest.raises(ControlError, match=r"another network.*dropout"):
        ControlNet.from_pretrained(tmp_path / "cn", wider)
    den = difflab.Denoiser(net, processes.Flow(), "flow")
    x = torch.randn(2, 2, 8, 8)
    with pytest.raises(ControlError, match=r"shape \(N, 4, 16, 16\).*got \(2, 3, 16, 16\)"):
        Controlled(den, Control(cn, torch.rand(2, 3, 16, 16)))(x, 0.5, **_cond())
    with pytest.raises(ControlError, match=r"\(N, 4, 16, 16\).*got \(2, 4, 8, 8\)"):
        Controlled(den, Control(cn, torch.rand(2, 4, 8, 8)))(x, 0.5, **_cond())
    with pytest.raises(ControlError, match="for 3 images"):
        Controlled(den, Control(cn, torch.rand(3, 4, 16, 16)))(x, 0.5, **_cond())
    with pytest.raises(ControlError, match="another network"):
        Controlled(difflab.Denoiser(wider, processes.Flow(), "flow"), Control(cn, torch.rand(2, 4, 16, 16)))
    with pytest.raises(ControlError, match="U-Net or DiT"):
        from difflab.models import MLP, MLPConfig

        ControlNet(MLP(MLPConfig(dim=2)), 1)
    with pytest.raises(ControlError, match="end <= start"):
        Control(cn, torch.rand(2, 4, 16, 16), start=0.2, end=0.5)
    with pytest.raises(ControlError, match="power-of-two"):
        ControlNet(net, 1, downscale=3)


def test_a_pipeline_samples_with_controls_and_loras_and_records_them():
    from difflab.adapters import LoRA
    from difflab.pipeline import Pipeline, PipelineError

    net = randomise(UNet(UNetConfig(in_channels=2, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_levels=(1,), head_dim=8, norm_groups=8, num_classes=3)).eval())
    pipe = Pipeline(net, processes.Flow(), "flow", sample_shape=(2, 8, 8), steps=3, num_classes=3, cond_dropout=0.1)
    cn, lora = _controlnet(net, 1, downscale=1), randomise(LoRA(net, rank=2), 7)
    control = torch.rand(3, 1, 8, 8)
    base = pipe(3, seed=0, class_labels=[0, 1, 2], guidance="cfg", guidance_options={"scale": 2.0})
    out = pipe(3, seed=0, class_labels=[0, 1, 2], guidance="cfg", guidance_options={"scale": 2.0}, batch_size=2,
               controls=Control(cn, control, 0.9), loras=[(lora, 0.5)])
    assert not torch.allclose(out.images, base.images, atol=1e-3)
    record = out.settings[2]["adapters"]
    assert record["loras"][0]["scale"] == 0.5 and record["controls"][0]["scale"] == 0.9
    assert out.settings[0]["adapters"]["controls"][0]["image_sha256"] != record["controls"][0]["image_sha256"]
    again = pipe(3, seed=0, class_labels=[0, 1, 2], guidance="cfg", guidance_options={"scale": 2.0}, batch_size=3,
                 controls=[Control(cn, control, 0.9)], loras=[(lora, 0.5)])
    torch.testing.assert_close(again.images, out.images, atol=1e-5, rtol=0)  # batching does not matter
    with pytest.raises(PipelineError, match="one per image"):
        pipe(2, controls=Control(cn, control))
    with pytest.raises(PipelineError, match="LoRAs or controls"):
        pipe.reproduce(out.settings[0])
    with pytest.raises(PipelineError, match=r"\(LoRA, scale\)"):
        pipe(2, loras=lora)


def test_edits_take_loras_and_controls_keep_the_unmasked_pixels_and_record_them():
    from difflab.adapters import LoRA, merge
    from difflab.pipeline import Pipeline, PipelineError

    net = randomise(UNet(UNetConfig(in_channels=2, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_levels=(1,), head_dim=8, norm_groups=8, num_classes=3)).eval())
    pipe = Pipeline(net, processes.Flow(), "flow", sample_shape=(2, 8, 8), steps=4, num_classes=3, cond_dropout=0.1)
    cn, lora = _controlnet(net, 1, downscale=1), randomise(LoRA(net, rank=2), 7)
    for p in lora.parameters():  # a LoRA whose update is visible at these tiny weights
        p.data.mul_(20)
    images = torch.rand(2, 2, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    kw = {"class_labels": [0, 2], "seed": 5}
    plain = pipe.edit(images, mask=mask, **kw)
    out = pipe.edit(images, mask=mask, controls=Control(cn, torch.rand(2, 1, 8, 8), 0.8), loras=[(lora, 0.7)], **kw)
    keep = mask.expand_as(images) == 0
    assert torch.equal(out.images[keep], images[keep])  # the kept pixels exactly, adapters or not
    assert (out.images - plain.images).abs()[~keep].max() > 1e-3
    assert out.settings[1]["adapters"]["loras"][0]["scale"] == 0.7 and out.settings[1]["denoiser_calls"] == 4
    with merge(net, [(lora, 0.7)]):  # a runtime LoRA in an img2img edit is the merged weights' edit
        merged = pipe.edit(images, strength=0.6, **kw)
    runtime = pipe.edit(images, strength=0.6, loras=[(lora, 0.7)], **kw)
    torch.testing.assert_close(runtime.images, merged.images, atol=1e-5, rtol=0)
    assert not torch.allclose(runtime.images, pipe.edit(images, strength=0.6, **kw).images, atol=1e-3)
    with pytest.raises(PipelineError, match="inversion edits take no controls"):
        pipe.edit(images, inversion="ddim", controls=Control(cn, torch.rand(2, 1, 8, 8)), **kw)


def test_a_dit_controlnet_copies_the_first_blocks_and_starts_as_the_base():
    from difflab.models import DiT, DiTConfig

    net = randomise(DiT(DiTConfig(in_channels=2, patch_size=2, hidden_size=32, depth=4, num_heads=2,
                                  context_dim=12)).eval())
    den = difflab.Denoiser(net, processes.Flow(), "flow")
    fresh = ControlNet(net, 1, downscale=2, blocks=2)
    assert fresh.points == ["block.0", "block.1"] and len(fresh.copy.blocks) == 2
    x, control, cond = torch.randn(2, 2, 8, 8), torch.rand(2, 1, 16, 16), _cond()
    with torch.no_grad():
        assert torch.equal(Controlled(den, Control(fresh, control))(x, 0.5, **cond), den(x, 0.5, **cond))
        trained = randomise(ControlNet(net, 1, downscale=2, blocks=2), 3).eval()
        x_in, time = den.network_inputs(x, 0.5)
        residuals = trained(x_in, time, control, **cond)
        assert residuals["block.0"].shape == (2, 16, 32)
        out = Controlled(den, Control(trained, control, 0.7))(x, 0.5, **cond)
        torch.testing.assert_close(out, den(x, 0.5, residuals={k: 0.7 * v for k, v in residuals.items()}, **cond))
        assert not torch.allclose(out, den(x, 0.5, **cond), atol=1e-4)
    with pytest.raises(ControlError, match=r"copies 1\.\.4 blocks"):
        ControlNet(net, 1, blocks=5)


def test_controlnet_training_and_controlnet_plus_change_only_the_controlnet():
    from difflab.data import Scenes
    from difflab.metrics.control import train_segmenter
    from difflab.pipeline import Pipeline
    from difflab.training.adapters import train_controlnet, train_controlnet_reward

    scenes = Scenes(n=24, resolution=16, seed=0)
    items = [scenes[i] for i in range(24)]
    images = torch.stack([it["x"] for it in items])
    classes = torch.stack([it["classes"] for it in items])
    seg = torch.stack([it["segmentation"] for it in items])
    net = randomise(UNet(UNetConfig(in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_levels=(1,), head_dim=8, norm_groups=8, num_classes=2)).eval())
    pipe = Pipeline(net, processes.Flow(), "flow", sample_shape=(3, 16, 16), steps=2, num_classes=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    labels = torch.tensor([it["count"] % 2 for it in items])
    a = train_controlnet(pipe, images, None, seg, steps=3, batch_size=4, progress=False, labels=labels)
    b = train_controlnet(pipe, images, None, seg, steps=3, batch_size=4, progress=False, labels=labels)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert any(float(p.detach().abs().max()) > 0 for name, p in a.named_parameters() if name.startswith("zero"))
    segmenter = train_segmenter(images, classes, steps=150, batch_size=16)
    with torch.no_grad():
        assert float((segmenter(images).argmax(1) == classes).float().mean()) > 0.9
    zero_before = a.zero["middle"].weight.clone()
    consistency: list = []
    plus = train_controlnet_reward(pipe, a, images, None, seg, classes, segmenter, steps=3, batch_size=4,
                                   progress=False, consistency_log=consistency, labels=labels)
    assert len(consistency) == 3 and all(c > 0 for c in consistency)
    assert not torch.equal(plus.zero["middle"].weight, zero_before)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the base never changes
    with pytest.raises(ValueError, match="control images for"):
        train_controlnet(pipe, images, None, seg[:3], steps=1, labels=labels)
    with pytest.raises(ValueError, match="class-conditional: give labels"):
        train_controlnet(pipe, images, None, seg, steps=1)
