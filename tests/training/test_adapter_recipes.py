"""``difflab adapt``: the built-in DreamBooth LoRA, LCM-LoRA and ControlNet recipes run on a tiny base and
write adapters that load onto it; recipe errors name the key."""

import json

import pytest
import torch
from PIL import Image
from tests.conftest import randomise

from difflab.adapters import ControlNet, LoRA
from difflab.cli import main
from difflab.models import UNet, UNetConfig
from difflab.pipeline import Pipeline
from difflab.processes import Flow
from difflab.training import config as train_config


@pytest.fixture
def base(tmp_path):
    net = randomise(UNet(UNetConfig(in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_levels=(1,), head_dim=8, norm_groups=8, context_dim=384)))
    pipe = Pipeline(net, Flow(), "flow", sample_shape=(3, 16, 16), steps=2, cond_dropout=0.1,
                    text_encoder={"name": "minilm", "max_tokens": 24})
    pipe.save_pretrained(tmp_path / "base")
    return tmp_path / "base", pipe


def test_dreambooth_lora_recipe_with_prior_preservation(tmp_path, base):
    folder, pipe = base
    concept = tmp_path / "concept"
    concept.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (200, 50, 200 - 20 * i)).save(concept / f"{i}.png")
        (concept / f"{i}.txt").write_text("a large magenta circle")
    sets = [f"base='{folder}'", f"data.options.root='{concept}'", "data.options.resolution=16", "prior.n=2",
            "prior.steps=2", "train.steps=2", "train.batch_size=2", f"out_dir='{tmp_path / 'lora'}'"]
    assert main(["adapt", "dreambooth_lora", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    out = tmp_path / "lora"
    assert (out / "prior.png").is_file() and len((out / "training.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "recipe.json").read_text())["prior"]["n"] == 2
    lora = LoRA.from_pretrained(out, pipe.network, base_identity=pipe.identity())
    assert lora.rank == 4 and any(float(p.detach().abs().max()) > 0 for p in lora.up.parameters())
    assert main(["adapt", "dreambooth_lora", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 1  # kept


def test_controlnet_recipe_on_scenes_and_recipe_errors(tmp_path, base):
    folder, pipe = base
    cfg = train_config.load("scenes_controlnet", [f"base='{folder}'", "data.options.n=8", "data.options.resolution=16",
                                                  "train.steps=2", "train.batch_size=2",
                                                  f"out_dir='{tmp_path / 'cn'}'"], kind=train_config.ADAPTER)
    from difflab.training.adapters import run_recipe

    out = run_recipe(cfg, progress=False)
    cn = ControlNet.from_pretrained(out, pipe.network, base_identity=pipe.identity())
    assert cn.settings["control_channels"] == 1
    with pytest.raises(train_config.ConfigError, match=r"unknown config key 'lora\.rnak'"):
        train_config.load("dreambooth_lora", ["lora.rnak=3"], kind=train_config.ADAPTER)
    with pytest.raises(train_config.ConfigError, match="kind must be one of 'lora', 'lcm_lora', 'controlnet'"):
        train_config.load("dreambooth_lora", ["kind='ipadapter'"], kind=train_config.ADAPTER)
    bad = {**cfg, "data": {**cfg["data"], "control": "depth"}, "out_dir": str(tmp_path / "cn2")}
    with pytest.raises(train_config.ConfigError, match=r"'depth' is not a control map.*edges"):
        run_recipe(bad, progress=False)
    assert torch.isfinite(pipe(1, prompts="a red circle").images).all()


def test_lcm_lora_recipe_makes_a_consistency_lora_that_samples_with_its_own_sampler(tmp_path):
    net = randomise(UNet(UNetConfig(in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_levels=(1,), head_dim=8, norm_groups=4, num_classes=10)))
    pipe = Pipeline(net, Flow(), "flow", sample_shape=(1, 8, 8), steps=2, num_classes=10, cond_dropout=0.1)
    folder = pipe.save_pretrained(tmp_path / "digits")
    sets = [f"base='{folder}'", "train.steps=3", "train.batch_size=4", f"out_dir='{tmp_path / 'lcm'}'"]
    assert main(["adapt", "digits_lcm_lora", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    lora = LoRA.from_pretrained(tmp_path / "lcm", pipe.network, base_identity=pipe.identity())
    assert lora.student == {"method": "lcm-lora", "sampler": "consistency", "steps": []}
    assert set(lora.layers) == set(pipe.network.weight_layers())  # targets = ["*"]: every layer
    assert len((tmp_path / "lcm" / "training.jsonl").read_text().splitlines()) == 3
    with pytest.warns(UserWarning, match="a LoRA of this call is a lcm-lora student.*'consistency' sampler"):
        pipe(2, loras=[(lora, 1.0)], sampler="euler", steps=2)
    out = tmp_path / "samples"
    assert main(["sample", str(folder), "--lora", str(tmp_path / "lcm"), "--sampler", "consistency", "--steps", "2",
                 "--n", "2", "--out", str(out)]) == 0
    with pytest.raises(train_config.ConfigError, match=r"steps_start .* must not exceed"):
        from difflab.training.adapters import run_recipe

        run_recipe(train_config.load("digits_lcm_lora", [*sets[:-1], f"out_dir='{tmp_path / 'bad'}'",
                                                         "consistency.steps_start=50"], kind=train_config.ADAPTER),
                   progress=False)
