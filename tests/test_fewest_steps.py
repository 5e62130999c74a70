"""Issue #19: DC-Solver's compensation, gradient estimation, restart sampling, per-model tuning,
and the fixes to churn and to rounding onto training steps."""

import json
import math

import numpy as np
import pytest
import torch

import difflab
from difflab import processes as P
from difflab import schedules
from difflab.analytic import GaussianMixture
from difflab.samplers import calibration
from difflab.samplers.base import Grid, churn_points
from difflab.samplers.unipc import compensation_weights

D = torch.float64


def _ring(proc):
    mix = GaussianMixture.ring(num_components=8, radius=1.0, std=0.1)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    return mix, mix.denoiser(proc, "flow" if isinstance(proc, P.Flow) else "eps"), noise


def test_snap_rounds_exact_ties_half_to_even_like_diffusers():
    sd = P.DiscreteVP.scaled_linear()
    index = (torch.arange(999, dtype=D) + 0.5).flip(0)  # every tie between two training steps, descending
    grid = torch.cat([(index + 1) / 1000, torch.zeros(1, dtype=D)])
    snapped = schedules.snap_to_training_steps(sd, grid)
    expected = np.unique(np.round(index.numpy()))[::-1]  # numpy's round (half to even) is diffusers'
    got = (snapped[:-1] * 1000 - 1).round().numpy()
    np.testing.assert_array_equal(got, expected)


def test_churn_deviates_from_edm_only_on_the_final_step_and_above_t_max():
    """EDM's Algorithm 2 churns every level in [s_tmin, s_tmax]; difflab documents two exceptions."""
    proc = P.DiscreteVP.scaled_linear()
    grid = Grid.build(proc, schedules.get("karras", proc, 10), torch.zeros(1))
    hats = churn_points(grid, s_churn=8.0, s_tmin=0.0, s_tmax=math.inf)
    extra = [h[3] for h in hats]
    assert extra[-1] == 0.0  # the step onto sigma = 0 is a plain denoise
    top = float(proc.noise_level(torch.tensor(1.0, dtype=D)))
    raised_past_t_max = [i for i in range(grid.steps - 1) if grid.sigma[i] / grid.alpha[i] * math.sqrt(2) > top]
    assert raised_past_t_max and all(extra[i] == 0.0 for i in raised_past_t_max)
    for i, (_, a_hat, s_hat, e) in enumerate(hats):  # the state's level is the level the denoiser is told
        if e > 0:
            level = grid.sigma[i] / grid.alpha[i]
            assert math.hypot(level, e) == pytest.approx(s_hat / a_hat, rel=1e-9)
    inside = [i for i in range(grid.steps - 1) if i not in raised_past_t_max]
    assert inside and all(extra[i] > 0 for i in inside)


def test_compensation_is_lagrange_interpolation_in_t():
    t = (1.0, 0.7, 0.45, 0.3, 0.0)
    for ratio in (0.5, 1.3, 2.0):
        w = compensation_weights(t, 3, ratio, dc_order=2)
        target = ratio * t[3] + (1 - ratio) * t[2]
        nodes = [t[3], t[2], t[1]]
        assert sum(w) == pytest.approx(1.0, abs=1e-12)
        # exact on a quadratic in t
        assert sum(wk * (2 * x * x - x + 3) for wk, x in zip(w, nodes, strict=True)) == pytest.approx(
            2 * target**2 - target + 3, abs=1e-12)
    assert compensation_weights(t, 1, 1.5, dc_order=2) is None  # warm-up: not enough history
    assert compensation_weights(t, 3, 1.0, dc_order=2) is None


def test_unipc_with_unit_ratios_is_unipc_and_ratios_change_it():
    _, den, noise = _ring(P.Flow())
    plain = difflab.sample(den, noise, "unipc", steps=6)
    assert torch.equal(difflab.sample(den, noise, "unipc", steps=6, dc_ratios=[1.0] * 6), plain)
    moved = difflab.sample(den, noise, "unipc", steps=6, dc_ratios=[1.0, 1.0, 1.0, 1.1, 1.1, 1.2])
    assert torch.isfinite(moved).all() and not torch.allclose(moved, plain)
    with pytest.raises(ValueError, match="one finite ratio per step"):
        difflab.sample(den, noise, "unipc", steps=6, dc_ratios=[1.0] * 5)


def test_gradient_estimation_with_gamma_one_is_ddim_and_gamma_two_is_better():
    proc = P.DiscreteVP.scaled_linear()
    mix, den, noise = _ring(proc)
    ge1 = difflab.sample(den, noise, "gradient_estimation", steps=12, ge_gamma=1.0, variable="noise_level")
    torch.testing.assert_close(ge1, difflab.sample(den, noise, "ddim", steps=12), rtol=1e-9, atol=1e-9)
    ref = mix.ode_solve(float(proc.sigma(torch.tensor(1.0, dtype=D))) * noise, proc, 1.0)
    err = {g: float(((difflab.sample(den, noise, "gradient_estimation", steps=12, ge_gamma=g) - ref) ** 2).mean())
           for g in (1.0, 2.0)}
    assert err[2.0] < 0.5 * err[1.0], err


def test_restart_without_restarts_is_its_solver_and_counts_its_evaluations():
    proc = P.Flow()
    _, den, noise = _ring(proc)
    plain = difflab.sample(den, noise, "heun", steps=8)
    assert torch.equal(difflab.sample(den, noise, "restart", steps=8, restarts=0), plain)
    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    out, nfe = difflab.sample(den, noise, "restart", steps=8, restarts=2, restart_steps=2, return_nfe=True,
                              generator=gens)
    _, heun_nfe = difflab.sample(den, noise, "heun", steps=8, return_nfe=True)
    assert nfe == heun_nfe + 2 * 2 * 2  # two restarts of two Heun steps, two evaluations each
    assert torch.isfinite(out).all() and not torch.allclose(out, plain)
    again = difflab.sample(den, noise[:5], "restart", steps=8, restarts=2, restart_steps=2,
                           generator=[torch.Generator().manual_seed(i) for i in range(5)])
    torch.testing.assert_close(again, out[:5], rtol=1e-10, atol=1e-10)  # batch invariance
    with pytest.raises(ValueError, match="deterministic ODE solver"):
        difflab.sample(den, noise, "restart", steps=8, solver="ddpm")


def test_tune_lowers_the_error_deterministically_and_round_trips():
    proc = P.Flow()
    mix, den, noise = _ring(proc)
    ref = mix.ode_solve(noise, proc, 1.0)
    first = calibration.tune(den, 4, noise, reference=ref, max_evals=120, coefficient_evals=80)
    second = calibration.tune(den, 4, noise, reference=ref, max_evals=120, coefficient_evals=80)
    assert first.spec == second.spec
    assert first.tuned_mse < 0.8 * first.start_mse, (first.start_mse, first.tuned_mse)
    restored = calibration.Tuned.from_config(json.loads(json.dumps(first.to_config())))
    assert restored.spec == first.spec
    out = restored.spec(den, noise)
    assert float(((out - ref) ** 2).mean()) == pytest.approx(first.tuned_mse, rel=1e-9)


def test_tune_command_saves_a_calibration_that_sample_uses(tmp_path, digits_pipe):
    from difflab.cli import main
    from difflab.pipeline import Pipeline, PipelineError

    digits_pipe.save_pretrained(tmp_path / "pipe")
    assert main(["tune", str(tmp_path / "pipe"), "--nfe", "3,4", "--n", "8", "--reference-steps", "12",
                 "--max-evals", "30", "--no-progress"]) == 0
    pipe = Pipeline.from_pretrained(tmp_path / "pipe")
    assert sorted(pipe.calibration) == [3, 4]
    spec = pipe.calibration[4].spec
    assert spec.name == "unipc" and len(spec.schedule) == 5
    out = pipe(4, steps=4, calibrated=True)
    assert out.settings[0]["schedule"] == list(spec.schedule)
    assert torch.equal(out.images, pipe(4, steps=4, sampler="unipc", schedule=list(spec.schedule),
                                        **spec.options).images)
    with pytest.raises(PipelineError, match=r"calibrated step counts: \[3, 4\]"):
        pipe(2, steps=6, calibrated=True)
    assert main(["sample", str(tmp_path / "pipe"), "--steps", "3", "--calibrated", "--n", "2",
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert main(["tune", str(tmp_path / "pipe"), "--nfe", "3", "--n", "8", "--reference-steps", "12",
                 "--max-evals", "30", "--bespoke", "--no-progress"]) == 0
    bespoke = Pipeline.from_pretrained(tmp_path / "pipe")
    assert sorted(bespoke.calibration) == [3, 4] and bespoke.calibration[3].spec.name == "bns"
    out = bespoke(2, steps=3, calibrated=True)
    assert out.settings[0]["sampler"] == "bns" and len(out.settings[0]["sampler_options"]["coefficients"]) == 3
    with torch.no_grad():
        next(pipe.network.parameters()).add_(0.01)
    pipe._identity = None
    with pytest.raises(PipelineError, match="other weights"):
        pipe(2, steps=4, calibrated=True)


@pytest.mark.parametrize(("sampler", "options"), [
    ("ddim", {}), ("dpmpp_2m", {}), ("deis", {}), ("ipndm", {}), ("unipc", {"order": 3}),
    ("unipc", {"dc_ratios": [1.0, 1.0, 1.2, 0.9, 1.1, 1.0]}),
])
@pytest.mark.parametrize("proc", [P.Flow(), P.DiscreteVP.scaled_linear()], ids=["flow", "vp"])
def test_bespoke_rows_reproduce_the_sampler_they_come_from(sampler, options, proc):
    """Every one-evaluation-per-step sampler is a bespoke solver on its grid (what fitting starts from)."""
    _, den, noise = _ring(proc)
    grid = schedules.get("logsnr" if isinstance(proc, P.DiscreteVP) else "trailing", proc, 6)
    rows = calibration.bespoke_rows(proc, sampler, grid, options)
    assert [len(r) for r in rows] == [2, 3, 4, 5, 6, 7]
    torch.testing.assert_close(difflab.sample(den, noise, "bns", schedule=grid, coefficients=rows),
                               difflab.sample(den, noise, sampler, schedule=grid, **options), rtol=1e-9, atol=1e-9)
    if sampler == "ddim":  # the bespoke solver's own default is DDIM
        torch.testing.assert_close(difflab.sample(den, noise, "bns", schedule=grid),
                                   difflab.sample(den, noise, "ddim", schedule=grid), rtol=1e-12, atol=1e-12)


def test_bespoke_rows_refuse_samplers_with_several_evaluations_per_step_and_bad_rows():
    proc = P.Flow()
    _, den, noise = _ring(proc)
    grid = schedules.get("trailing", proc, 4)
    with pytest.raises(ValueError, match="one evaluation per grid point"):
        calibration.bespoke_rows(proc, "heun", grid)
    with pytest.raises(ValueError, match=r"4 rows of 2, 3, \.\.\., 5"):
        difflab.sample(den, noise, "bns", schedule=grid, coefficients=[[1.0, 0.5]] * 4)


def test_tune_bespoke_fits_every_coefficient_and_beats_the_tuned_solver():
    proc = P.DiscreteVP.scaled_linear()
    mix, den, _ = _ring(proc)
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(3), dtype=D)
    ref = mix.ode_solve(float(proc.sigma(torch.tensor(1.0, dtype=D))) * noise, proc, 1.0)
    kw = dict(reference=ref, max_evals=150, coefficient_evals=60)
    plain = calibration.tune(den, 4, noise, **kw)
    fitted = calibration.tune(den, 4, noise, bespoke=True, bespoke_iterations=60, **kw)
    assert fitted.spec.name == "bns" and fitted.spec.schedule == plain.spec.schedule
    assert fitted.tuned_mse < 0.5 * plain.tuned_mse, (plain.tuned_mse, fitted.tuned_mse)
    test = torch.randn(256, 2, generator=torch.Generator().manual_seed(4), dtype=D)  # and on new noise
    test_ref = mix.ode_solve(float(proc.sigma(torch.tensor(1.0, dtype=D))) * test, proc, 1.0)
    errs = [float(((t.spec(den, test) - test_ref) ** 2).mean()) for t in (plain, fitted)]
    assert errs[1] < errs[0], errs
    restored = calibration.Tuned.from_config(json.loads(json.dumps(fitted.to_config())))
    assert torch.equal(restored.spec(den, test), fitted.spec(den, test))


def test_fit_bespoke_trains_through_a_network_with_conditions(digits_pipe):
    den = digits_pipe.denoiser()
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"class_labels": torch.arange(6)}
    grid = schedules.get("trailing", den.process, 3)
    with torch.no_grad():
        ref = 2.0 * difflab.sample(den, noise, "dpmpp_3m", steps=30, cond=cond)  # a target far from the start
    rows = calibration.bespoke_rows(den.process, "unipc", grid)

    def mse(r) -> float:
        out = difflab.sample(den, noise, "bns", schedule=grid, coefficients=r, cond=cond)
        return float(((out - ref) ** 2).mean())

    before = [p.detach().clone() for p in digits_pipe.network.parameters()]
    same_grid, fitted = calibration.fit_bespoke(den, grid, rows, noise, ref, iterations=15, cond=cond)
    assert torch.equal(same_grid, grid)
    assert mse(fitted) < 0.1 * mse(rows), (mse(rows), mse(fitted))
    assert all(torch.equal(a, b) for a, b in zip(before, digits_pipe.network.parameters(), strict=True))
    assert all(p.grad is None for p in digits_pipe.network.parameters())


def test_fit_bespoke_can_learn_the_times_and_keeps_them_ordered():
    proc = P.DiscreteVP.scaled_linear()
    mix, den, noise = _ring(proc)
    ref = mix.ode_solve(float(proc.sigma(torch.tensor(1.0, dtype=D))) * noise, proc, 1.0)
    grid = schedules.get("uniform", proc, 4)
    rows = calibration.bespoke_rows(proc, "dpmpp_2m", grid)
    err = {}
    for learn in (False, True):
        g, r = calibration.fit_bespoke(den, grid, rows, noise, ref, iterations=40, learn_times=learn)
        out = difflab.sample(den, noise, "bns", schedule=g, coefficients=r)
        err[learn] = float(((out - ref) ** 2).mean())
    assert float(g[0]) == 1.0 and float(g[-1]) == 0.0 and bool((g[1:] < g[:-1]).all())
    assert not torch.allclose(g, grid)
    assert err[True] < err[False], err


def test_fit_bespoke_with_ld3_slack_still_lowers_the_error_on_new_noise():
    proc = P.Flow()
    mix, den, noise = _ring(proc)
    ref = mix.ode_solve(noise, proc, 1.0)
    test = torch.randn(64, 2, generator=torch.Generator().manual_seed(9), dtype=D)
    test_ref = mix.ode_solve(test, proc, 1.0)
    grid = schedules.get("trailing", proc, 4)
    rows = calibration.bespoke_rows(proc, "unipc", grid)
    _, loose = calibration.fit_bespoke(den, grid, rows, noise, ref, iterations=40, slack=0.05)
    _, tight = calibration.fit_bespoke(den, grid, rows, noise, ref, iterations=40)
    assert loose != tight

    def err(r) -> float:
        return float(((difflab.sample(den, test, "bns", schedule=grid, coefficients=r) - test_ref) ** 2).mean())

    assert err(loose) < err(rows), (err(rows), err(loose))
