import json

import pytest
import torch

import difflab
from difflab import processes as P
from difflab import schedules
from difflab.analytic import GaussianMixture
from difflab.samplers import calibration

FIXED = ["uniform", "trailing", "leading", "karras", "logsnr", "polynomial"]


@pytest.mark.parametrize("name", FIXED)
def test_grids_descend_to_zero(process, name):
    for steps in (1, 2, 7, 30):
        grid = schedules.get(name, process, steps)
        assert grid.dtype == torch.float64 and grid.shape == (steps + 1,)
        assert float(grid[-1]) == 0.0 and bool((grid[1:] < grid[:-1]).all())
        if name != "leading":
            assert float(grid[0]) == process.t_max


def test_karras_matches_eq5_in_the_noise_level():
    edm = P.EDM()
    grid = schedules.get("karras", edm, 10, rho=7.0)
    i = torch.arange(10, dtype=torch.float64)
    expected = (80 ** (1 / 7) + i / 9 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(edm.sigma(grid[:-1]), expected)


def test_trailing_and_leading_match_diffusers_index_conventions():
    sd = P.DiscreteVP.scaled_linear()
    trailing = sd.model_time(schedules.get("trailing", sd, 10)[:-1])
    torch.testing.assert_close(trailing, torch.arange(999, 0, -100, dtype=torch.float64))
    leading = sd.model_time(schedules.get("leading", sd, 10, offset=1)[:-1])
    torch.testing.assert_close(leading, torch.arange(901, 0, -100, dtype=torch.float64))
    snapped = schedules.snap_to_training_steps(sd, schedules.get("karras", sd, 10))
    idx = sd.model_time(snapped[:-1])
    torch.testing.assert_close(idx, idx.round())


def test_flow_noise_level_schedules_start_at_pure_noise_and_shrink_the_first_step():
    flow = P.Flow()
    for name in ("karras", "logsnr"):
        g10, g40 = schedules.get(name, flow, 10), schedules.get(name, flow, 40)
        assert float(flow.alpha(g10[0])) == 0.0
        assert float(g40[0] - g40[1]) < float(g10[0] - g10[1])


def test_explicit_grids_and_errors(tmp_path):
    flow = P.Flow()
    grid = schedules.get("explicit", flow, t=[1.0, 0.5, 0.1])
    assert grid.tolist() == [1.0, 0.5, 0.1, 0.0]
    with pytest.raises(ValueError, match="strictly decreasing"):
        schedules.get("explicit", flow, t=[0.5, 0.7])
    with pytest.raises(ValueError, match="choose one of"):
        schedules.get("cosine_spaced", flow, 4)
    with pytest.raises(ValueError, match="its options are: rho"):
        schedules.get("karras", flow, 4, sigma_max=3)
    path = tmp_path / "grid.json"
    schedules.save(path, grid, flow, sampler="ddim")
    assert json.loads(path.read_text())["sampler"] == "ddim"
    torch.testing.assert_close(schedules.get("optimized", flow, 3, path=path), grid)
    with pytest.raises(ValueError, match="made for"):
        schedules.load(path, P.EDM())


def test_optimizer_beats_best_fixed_schedule_on_held_out_batch(tmp_path):
    torch.manual_seed(0)
    mix = GaussianMixture.low_rank(dim=8, num_components=4, rank=2, floor=0.02)
    proc = P.DiscreteVP.scaled_linear()
    den = mix.denoiser(proc, "eps")

    def batch(seed, n=128):
        noise = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return noise, mix.ode_solve(float(proc.sigma(1.0)) * noise, proc, 1.0)

    (n_a, r_a), (n_b, r_b) = batch(0), batch(1)
    grid = calibration.optimize_schedule(den, "dpmpp_2m", 5, n_a, reference=r_a, max_evals=400)

    def err(s):
        return float(((difflab.sample(den, n_b, "dpmpp_2m", steps=5, schedule=s) - r_b) ** 2).mean().sqrt())

    best_fixed = min(err(name) for name in FIXED)
    assert err(grid) < 0.95 * best_fixed
    schedules.save(tmp_path / "ays.json", grid, proc)
    assert err(schedules.get("optimized", proc, 5, path=tmp_path / "ays.json")) == err(grid)


def test_named_schedules_are_validated_like_explicit_grids():
    proc = P.DiscreteVP.scaled_linear()
    assert float(schedules.get("leading", proc, 10, offset=1)[0]) <= proc.t_max
    with pytest.raises(ValueError, match=r"schedule 'leading' with steps=1000 .*t_max"):
        schedules.get("leading", proc, 1000, offset=1)  # index 999 + 1 is past the last training step
