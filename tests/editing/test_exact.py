"""EDICT and BDIA undo their own runs to rounding, for every process, prediction and step count."""

import pytest
import torch
from tests.conftest import ALL_PROCESSES

from difflab import analytic, editing, predictions

METHODS = {"edict": editing.EDICT, "bdia": editing.BDIA}


def _setup(process_name, prediction, dtype):
    process = ALL_PROCESSES[process_name]()
    if predictions.get(prediction).needs_alpha and float(process.alpha(process.t_max)) == 0.0:
        pytest.skip(f"{prediction} is undefined where alpha = 0")
    mix = analytic.GaussianMixture.low_rank(dim=16, num_components=4, rank=3)
    image = mix.sample(6, generator=torch.Generator().manual_seed(0)).to(dtype)
    return mix.denoiser(process, prediction), image


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("process_name", sorted(ALL_PROCESSES))
@pytest.mark.parametrize("steps", [2, 7, 50])
def test_round_trip_is_exact_to_rounding(method, process_name, steps):
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-9)):
        den, image = _setup(process_name, "x0", dtype)
        exact = METHODS[method]()
        state = exact.invert(den, image, steps, "karras")
        assert state.first.dtype == torch.float64 and not torch.equal(state.first, image.double())
        assert state.dtype == dtype
        back = exact.sample(den, state)
        assert back.dtype == dtype and float((back - image).abs().max()) <= tol, (method, process_name, steps, dtype)


@pytest.mark.parametrize("prediction", ["eps", "v", "flow", "edm"])
def test_every_prediction_round_trips(prediction):
    for name in ("scaled_linear", "flow"):
        try:
            den, image = _setup(name, prediction, torch.float32)
        except pytest.skip.Exception:
            continue
        for exact in (editing.EDICT(), editing.BDIA()):
            assert float((exact.sample(den, exact.invert(den, image, 20)) - image).abs().max()) <= 1e-4


def test_bdia_stays_exact_over_long_runs_and_edict_adapts_its_mix():
    den, image = _setup("scaled_linear", "eps", torch.float32)
    for steps in (200, 1000):
        state = editing.BDIA().invert(den, image, steps)
        assert float((editing.BDIA().sample(den, state) - image).abs().max()) <= 1e-4
    # the paper's fixed p = 0.93 grows the copies' difference by 1/p^2 per inverted step: lost at 500
    fixed = editing.EDICT(mix=0.93)
    assert not float((fixed.sample(den, fixed.invert(den, image, 500)) - image).abs().max()) <= 1e-3
    adaptive = editing.EDICT()
    assert adaptive.weight(50) == 0.93 and 0.96 < adaptive.weight(200) < 0.98
    for steps in (500, 1000):
        assert float((adaptive.sample(den, adaptive.invert(den, image, steps)) - image).abs().max()) <= 1e-4


def test_a_conditioned_and_guided_run_inverts_exactly():
    from difflab import guidance, processes

    mix = analytic.GaussianMixture.low_rank(dim=16, num_components=4, rank=3, num_classes=4)
    den = guidance.guide(mix.denoiser(processes.DiscreteVP.scaled_linear(), "eps"), "cfg", scale=4.0)
    labels = torch.tensor([0, 1, 2, 3])
    image = mix.sample(4, generator=torch.Generator().manual_seed(1), labels=labels)
    for exact in (editing.EDICT(), editing.BDIA()):
        state = exact.invert(den, image, 30, cond={"class_labels": labels})
        back = exact.sample(den, state, cond={"class_labels": labels})
        assert float((back - image).abs().max()) <= 1e-4
        other = exact.sample(den, state, cond={"class_labels": torch.tensor([3, 2, 1, 0])})
        assert float((other - image).abs().max()) > 0.1  # a new condition edits the image


def test_fresh_noise_samples_and_bad_settings_are_refused():
    den, _ = _setup("flow", "flow", torch.float32)
    noise = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    for exact in (editing.EDICT(), editing.BDIA()):
        assert torch.isfinite(exact.sample(den, noise, 10)).all()
    with pytest.raises(editing.EditError, match="2 steps"):
        editing.BDIA().invert(den, noise, 1)
    with pytest.raises(editing.EditError, match="one step"):
        editing.EDICT().invert(den, noise, 1)
    with pytest.raises(editing.EditError, match="mix"):
        editing.EDICT(mix=1.5)
    with pytest.raises(editing.EditError, match="gamma"):
        editing.BDIA(gamma=0.0)
