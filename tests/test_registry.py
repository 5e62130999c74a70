"""One registry type for every kind, and the config protocol: every registered process,
prediction, guidance method and network config round-trips through JSON exactly."""

import json

import pytest
import torch

import difflab.data
import difflab.metrics
import difflab.metrics.features
import difflab.models.conditioning  # noqa: F401
from difflab import Denoiser, guidance, models, predictions, processes, samplers, schedules
from difflab.registry import KINDS, Registry


def _json(config):
    return json.loads(json.dumps(config))


def test_every_kind_uses_the_one_registry_type():
    expected = {"process", "prediction", "schedule", "sampler", "guidance", "network", "text encoder",
                "feature extractor", "dataset", "metric"}
    assert expected <= set(KINDS), list(KINDS)
    for registry in KINDS.values():
        assert isinstance(registry, Registry) and registry.available()
        for name in registry:
            assert registry.reference(name), f"{registry.kind} {name!r} names no paper or description"
    with pytest.raises(ValueError, match=r"unknown sampler 'nope'; choose one of .*dpmpp_2m"):
        samplers.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        schedules.register("karras", "again")(lambda process, steps: None)


@pytest.mark.parametrize("kind", processes.available())
def test_every_process_round_trips_through_json(kind):
    variants = [processes.get(kind)]
    if kind == "flow":
        variants.append(processes.Flow(shift=3.0, t_min=2e-3))
    if kind == "discrete_vp":
        variants += [processes.DiscreteVP.cosine(zero_terminal_snr=True), processes.get("linear", num_train_steps=500)]
    for process in variants:
        rebuilt = processes.from_config(_json(process.to_config()))
        assert rebuilt == process and type(rebuilt) is type(process)
        t = torch.linspace(0, 1, 11, dtype=torch.float64)
        assert torch.equal(rebuilt.alpha(t), process.alpha(t)) and torch.equal(rebuilt.sigma(t), process.sigma(t))


@pytest.mark.parametrize("name", predictions.available())
def test_every_prediction_round_trips_through_json(name):
    pred = predictions.get(name, sigma_data=0.3) if name == "edm" else predictions.get(name)
    rebuilt = predictions.from_config(_json(pred.to_config()))
    assert rebuilt == pred
    if name == "edm":
        assert rebuilt.sigma_data == 0.3


@pytest.mark.parametrize("name", guidance.available())
def test_every_guidance_method_round_trips_through_json(name):
    net = models.MLP(models.MLPConfig(dim=2, hidden=16, depth=2, num_classes=3))
    den = Denoiser(net, processes.Flow(), "flow")
    inputs = {"weak": Denoiser(net, processes.Flow(), "flow")} if name == "autoguidance" else {}
    options = {"scale": 2.5, "interval": (0.1, 5.0)}
    if name == "pag":
        with pytest.raises(ValueError, match="no self-attention"):
            guidance.guide(den, name, **options)
        net = models.DiT(models.DiTConfig(in_channels=1, patch_size=2, hidden_size=16, depth=2, num_heads=2,
                                          num_classes=3))
        den = Denoiser(net, processes.Flow(), "flow")
        options["cfg_scale"] = 2.0
    method = guidance.guide(den, name, **options, **inputs)
    config = _json(method.to_config())
    rebuilt = guidance.from_config(config, den, **inputs)
    assert type(rebuilt) is type(method) and rebuilt.to_config() == config
    assert config["scale"] == 2.5 and config["interval"] == [0.1, 5.0]


@pytest.mark.parametrize("kind", models.REGISTRY.available())
def test_every_network_config_round_trips_through_json(kind):
    cls = models.REGISTRY.get(kind)
    small = {"unet": dict(model_channels=16, channel_mult=(1, 2), head_dim=8, norm_groups=8),
             "dit": dict(hidden_size=32, depth=2, num_heads=2), "mlp": dict(dim=2, hidden=16),
             "vae": dict(base_channels=16, channel_mult=(1, 2), norm_groups=8),
             "mmdit": dict(hidden_size=32, depth=2, num_heads=2, context_dim=8, pooled_dim=4, position_grid=8,
                           dual_attention=(0,))}[kind]
    net = cls.from_config(small)
    config = _json(net.to_config())
    rebuilt = models.from_config(config)
    assert type(rebuilt) is cls and rebuilt.config == net.config and _json(rebuilt.to_config()) == config


def test_sampler_specs_round_trip_and_are_checked_when_made():
    spec = samplers.SamplerSpec("unipc", 7, "logsnr", options={"order": 3})
    config = _json(spec.to_config())
    assert samplers.SamplerSpec.from_config(config) == spec
    explicit = samplers.SamplerSpec("ddim", 3, (0.9, 0.5, 0.1))
    assert samplers.SamplerSpec.from_config(_json(explicit.to_config())) == explicit
    den = Denoiser.from_fn(lambda x, t: 0.5 * x, processes.Flow(), "x0")
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(spec(den, noise), samplers.sample(den, noise, "unipc", 7, "logsnr", order=3))
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.SamplerSpec("dpmpp_9m")
    with pytest.raises(ValueError, match="takes no option"):
        samplers.SamplerSpec("ddim", options={"order": 2})
    with pytest.raises(ValueError, match="steps must be"):
        samplers.SamplerSpec("ddim", 0)
    with pytest.raises(ValueError, match="unknown schedule"):
        samplers.SamplerSpec("ddim", 4, "fancy")


def test_an_unknown_sampler_in_a_recipe_fails_before_training(tmp_path):
    from difflab import recipes
    from difflab.training import config as train_config
    from difflab.training.config import ConfigError
    from difflab.training.trainer import Trainer

    cfg = train_config.load(recipes.path("toy2d"), [f"out_dir={tmp_path}", "sample.sampler='dpmpp_9m'"])
    with pytest.raises(ConfigError, match=r"\[sample\] section: unknown sampler 'dpmpp_9m'"):
        Trainer(cfg)
    assert not tmp_path.joinpath("final").exists()
