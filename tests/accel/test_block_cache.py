"""Block caches (DeepCache, FORA-style residual reuse): exact when they refresh every evaluation,
no state carried from one sampling run to the next, and composable with samplers and guidance."""

import pytest
import torch

import difflab
from difflab import accel, guidance, processes
from difflab.accel.block_cache import deep_cache_blocks
from difflab.models import DiT, DiTConfig, UNet, UNetConfig


def _perturbed(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def unet_den():
    net = _perturbed(UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                     attention_levels=(1,), head_dim=8, norm_groups=8, num_classes=3)))
    return difflab.Denoiser(net, processes.Flow(), "flow")


@pytest.fixture(scope="module")
def dit_den():
    net = _perturbed(DiT(DiTConfig(in_channels=1, patch_size=2, hidden_size=32, depth=4, num_heads=2,
                                   num_classes=3)))
    return difflab.Denoiser(net, processes.DiscreteVP.scaled_linear(), "eps")


NOISE = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
LABELS = {"class_labels": torch.tensor([0, 1, 2])}


def _sample(den, sampler="dpmpp_2m", steps=6, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return difflab.sample(den, NOISE, sampler, steps=steps, cond=LABELS, generator=gen)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun", "unipc", "euler_ancestral"])
def test_refreshing_every_evaluation_is_exact(unet_den, dit_den, sampler):
    with torch.no_grad():
        plain = _sample(unet_den, sampler, seed=5)
        with accel.deep_cache(unet_den, interval=1, depth=1) as fast:
            assert torch.equal(_sample(fast, sampler, seed=5), plain)
        plain_dit = _sample(dit_den, sampler, seed=5)
        blocks = dit_den.net.block_names()[1:-1]
        with accel.block_cache(dit_den, blocks, refresh=1, reuse="residual") as fast:
            assert torch.equal(_sample(fast, sampler, seed=5), plain_dit)
    assert fast.report["block_reuses"] == 0


def test_caching_skips_blocks_and_stays_close(unet_den):
    with torch.no_grad():
        plain = _sample(unet_den, steps=9)
        with accel.deep_cache(unet_den, interval=3, depth=1) as fast:
            cached = _sample(fast, steps=9)
    report = fast.report
    assert report["evaluations"] == 9 and report["refreshes"] == 3
    assert report["block_reuses"] == 6 * len(deep_cache_blocks(unet_den.net.block_names(), 1))
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    assert float((cached - plain).abs().max()) < 0.5 * float(plain.abs().max())


def test_no_state_leaks_from_one_run_to_the_next(unet_den):
    with torch.no_grad():
        with accel.deep_cache(unet_den, interval=[0, 2, 5]) as fast:  # non-uniform refresh
            first, second = _sample(fast), _sample(fast)
        with accel.deep_cache(unet_den, interval=[0, 2, 5]) as fresh:
            alone = _sample(fresh)
    assert torch.equal(first, second) and torch.equal(first, alone)
    assert fast.report["runs"] == 2
    assert not unet_den.net.__dict__.get("_block_hooks")  # nothing left on the network


@pytest.mark.parametrize("method", ["cfg", "apg", "pag"])
def test_caches_compose_with_guidance(unet_den, method):
    options = {"scale": 2.0, **({"cfg_scale": 2.0} if method == "pag" else {})}
    with torch.no_grad():
        plain = _sample(guidance.guide(unet_den, method, **options))
        with accel.deep_cache(unet_den, interval=1) as fast:
            assert torch.equal(_sample(guidance.guide(fast, method, **options)), plain)
        with accel.deep_cache(unet_den, interval=2) as fast:
            assert torch.isfinite(_sample(guidance.guide(fast, method, **options))).all()


def test_caches_that_cannot_apply_are_refused(dit_den):
    with pytest.raises(ValueError, match="DeepCache needs a U-Net"):
        with accel.deep_cache(dit_den):
            pass
    exact = difflab.Denoiser.from_fn(lambda x, t: x, processes.Flow(), "x0")
    with pytest.raises(ValueError, match=r"hook interface"):
        with accel.block_cache(exact, ["block.0"]):
            pass
    with pytest.raises(ValueError, match="must include evaluation 0"):
        with accel.block_cache(dit_den, ["block.1"], refresh=[1, 3]):
            pass


def test_a_pipeline_takes_an_accelerator_as_data_and_reproduces_it(tmp_path):
    from difflab.cli import main
    from difflab.pipeline import Pipeline

    net = _perturbed(UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                     attention_levels=(1,), head_dim=8, norm_groups=8, num_classes=3)))
    pipe = Pipeline(net, processes.Flow(), "flow", sample_shape=(1, 8, 8), steps=6, num_classes=3)
    plain = pipe(3, seed=0)
    assert torch.equal(pipe(3, seed=0, accelerator={"name": "deep_cache", "interval": 1}).images, plain.images)
    fast = pipe(3, seed=0, accelerator={"name": "deep_cache", "interval": 3})
    assert fast.settings[0]["accelerator"] == {"name": "deep_cache", "interval": 3}
    assert not torch.equal(fast.images, plain.images)
    assert torch.equal(pipe.reproduce(fast.settings[2]), fast.images[2])
    pipe.save_pretrained(tmp_path / "pipe")
    assert main(["sample", str(tmp_path / "pipe"), "--n", "2", "--accelerator", "deep_cache",
                 "--accelerator-option", "interval=2", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    with pytest.raises(ValueError, match="unknown accelerator"):
        pipe(2, accelerator={"name": "tome"})


def test_the_flop_counter_sees_what_a_cache_skips(unet_den):
    with torch.no_grad():
        _, full = accel.count_flops(lambda: _sample(unet_den, steps=6))
        with accel.deep_cache(unet_den, interval=3) as fast:
            _, cached = accel.count_flops(lambda: _sample(fast, steps=6))
    assert 0 < cached < 0.8 * full
