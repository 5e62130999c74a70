"""A run whose loss explodes without turning NaN is stopped (or warned about), naming the last good
checkpoint; a healthy run is never stopped."""

import pytest
import torch

from difflab import recipes
from difflab.training import config as train_config
from difflab.training.trainer import DivergenceGuard, Trainer, TrainingError

SMALL = ["model.hidden=32", "model.depth=2", "data.batch_size=16", "data.options={kind='ring', n=256}",
         "train.num_threads=1", "train.tensorboard=false", "train.log_every=5"]


def test_the_guard_flags_an_explosion_and_not_noise():
    guard = DivergenceGuard("stop", factor=100.0, patience=3)
    g = torch.Generator().manual_seed(0)
    for step in range(200):  # a healthy, noisy run
        assert guard.check(step, float(1 + 0.5 * torch.rand(1, generator=g)), 2.0) is None
    assert guard.check(200, 5.6e29, float("inf")) is None and guard.check(201, 1e30, 3.0) is None
    assert "diverged at step 202" in guard.check(202, 1e30, 3.0)
    assert DivergenceGuard("off", 100.0, 1).check(0, 1e30, float("inf")) is None


def test_an_adversarial_loss_below_zero_that_turns_positive_is_not_an_explosion_but_its_gradient_can_be():
    guard = DivergenceGuard("stop", factor=100.0, patience=3)
    for step in range(50):  # a GAN generator's loss sits around -0.5
        assert guard.check(step, -0.5 + 0.01 * (step % 5), 1.0) is None
    assert all(guard.check(50 + k, 0.05, 1.2) is None for k in range(10))  # the discriminator wins for a while
    assert guard.check(60, 0.05, 1e4) is None and guard.check(61, 0.05, 1e4) is None
    assert "diverged at step 62" in guard.check(62, 0.05, 1e4)
    game = DivergenceGuard("stop", factor=100.0, patience=3, watch_loss=False)  # an objective marked adversarial
    for step in range(50):
        assert game.check(step, 0.006, 40.0) is None
    assert all(game.check(50 + k, 1.3, 33.0) is None for k in range(30))  # a swing of 200x the median loss


def test_an_exploding_run_stops_at_its_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = train_config.load(recipes.path("toy2d"), [*SMALL, "train.steps=60", "train.checkpoint_every=10",
                                                    "train.divergence_patience=5", f"out_dir={tmp_path}"])
    trainer = Trainer(cfg)
    real, calls = trainer._loss, []

    def exploding(batch):  # from step 30 the loss grows by 1e6 per step, as a blown-up run's does
        calls.append(1)
        loss = real(batch)
        return loss * (1e6 ** max(0, len(calls) - 30))

    monkeypatch.setattr(trainer, "_loss", exploding)
    with pytest.raises(TrainingError, match=r"diverged at step 3[0-9].*Last good checkpoint: .*step_00000030"):
        trainer.run(progress=False)
    assert not (tmp_path / "final").exists()


def test_a_healthy_run_is_not_stopped(tmp_path):
    cfg = train_config.load(recipes.path("toy2d"), [*SMALL, "train.steps=80", "train.checkpoint_every=80",
                                                    "train.divergence_patience=1", f"out_dir={tmp_path}"])
    Trainer(cfg).run(progress=False)
    assert (tmp_path / "final" / "pipeline.json").is_file()
