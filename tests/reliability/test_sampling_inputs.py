"""Bad sampling input is refused where it enters, with what was wrong and what to do."""

import json

import pytest
import torch

from difflab.cli import main
from difflab.models import UNet, UNetConfig
from difflab.pipeline import Pipeline, PipelineError
from difflab.processes import Flow


def _pipe(seed=0):
    torch.manual_seed(seed)
    net = UNet(UNetConfig(in_channels=1, model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(),
                          norm_groups=4, num_classes=3))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return Pipeline(net, Flow(), "flow", sample_shape=(1, 8, 8), steps=3, num_classes=3, cond_dropout=0.1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 0}, "n must be a whole number >= 1"), ({"n": 2, "batch_size": 0}, "batch_size must be"),
    ({"n": 2, "steps": 0}, "steps must be a whole number >= 1"),
    ({"n": 2, "guidance": "cfg", "guidance_options": {"scale": float("nan")}}, "finite number"),
    ({"n": 2, "guidance": "cfg", "guidance_options": {"scale": float("inf")}}, "finite number"),
])
def test_bad_sampling_arguments_are_refused(kwargs, message):
    with pytest.raises((PipelineError, ValueError), match=message):
        _pipe()(**kwargs)


def test_settings_from_another_model_or_malformed_are_refused(tmp_path, capsys):
    _pipe(0).save_pretrained(tmp_path / "a")
    _pipe(1).save_pretrained(tmp_path / "b")
    assert main(["sample", str(tmp_path / "a"), "--n", "2", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    settings = tmp_path / "s" / "00001.json"
    assert main(["sample", str(tmp_path / "a"), "--settings", str(settings), "--out", str(tmp_path / "r")]) == 0
    assert main(["sample", str(tmp_path / "b"), "--settings", str(settings), "--out", str(tmp_path / "r2")]) == 1
    assert "made by another model" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"seed": 1}))
    assert main(["sample", str(tmp_path / "a"), "--settings", str(broken), "--out", str(tmp_path / "r3")]) == 1
    assert "lacks steps" in capsys.readouterr().err
    broken.write_text("{not json")
    assert main(["sample", str(tmp_path / "a"), "--settings", str(broken), "--out", str(tmp_path / "r4")]) == 1
    assert "is not valid JSON" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "a"), "--n", "0", "--out", str(tmp_path / "r5")]) == 1
    assert "n must be a whole number" in capsys.readouterr().err


def test_the_model_identity_follows_the_weights_in_any_dtype():
    pipe = _pipe(0)
    first = pipe.identity()
    assert first == _pipe(0).identity() and first != _pipe(1).identity()
    pipe.network.to(torch.bfloat16)
    pipe._identity = None
    assert len(pipe.identity()) == 16 and pipe.identity() != first
