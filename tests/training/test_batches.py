"""The seeded batch plan on its own, and the trainer's hooks for other recipes (objective,
trained parameters, caller-attached logs)."""

import torch

from difflab import processes, recipes
from difflab.training import config as train_config
from difflab.training.batches import BatchPlan
from difflab.training.trainer import Trainer


def test_a_batch_depends_only_on_the_plan_and_the_step():
    x = torch.randn(50, 3)
    labels = torch.arange(50) % 5
    plan = BatchPlan(50, 8, seed=3, cond_dropout=0.3)
    proc = processes.Flow()
    a = plan.draw(7, 0, proc, x, labels)
    b = plan.draw(7, 0, proc, x, labels)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(plan.draw(8, 0, proc, x, labels)["noise"], a["noise"])
    epoch = torch.cat([plan.indices(k) for k in range(50 // 8)])
    assert len(set(epoch.tolist())) == len(epoch) == 48  # an epoch draws without replacement
    assert (a["labels"] == -1).any() and (a["labels"] >= 0).any()  # condition dropout to the null label


def test_ranks_split_the_one_process_batch_exactly():
    x = torch.randn(64, 2, 4, 4)
    proc = processes.DiscreteVP.scaled_linear()
    whole = BatchPlan(64, 16, seed=1, accumulate=2).draw(5, 1, proc, x)
    parts = [BatchPlan(64, 16, seed=1, accumulate=2, world=2, rank=r).draw(5, 1, proc, x) for r in (0, 1)]
    for key in whole:
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), key


SMALL = ["model.hidden=32", "model.depth=2", "data.batch_size=16", "data.options={kind='ring', n=256}",
         "train.num_threads=1", "train.steps=4", "train.checkpoint_every=4", "train.tensorboard=false"]


def test_trainer_takes_another_objective_and_a_parameter_choice(tmp_path):
    cfg = train_config.load(recipes.path("toy2d"), [*SMALL, f"out_dir={tmp_path}"])
    seen = []

    def objective(net, batch, **cond):  # e.g. a distillation loss: here plain regression to x0
        seen.append(batch["x0"].shape[0])
        return ((net(batch["x0"] + batch["noise"], batch["t"], **cond) - batch["x0"]) ** 2).mean()

    trainer = Trainer(cfg, objective=objective, parameters=lambda model: model.out.parameters())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    records = []
    trainer.run(progress=False, logs=[type("Keep", (), {"__call__": lambda self, r: records.append(r),
                                                        "close": lambda self: None})()])
    after = trainer.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith("out.") for k in changed)
    assert seen == [16] * 4 and [r["step"] for r in records] == [1, 2, 3, 4]
    assert not (tmp_path / "metrics.jsonl").exists()  # the caller chose its logs
    assert (tmp_path / "final" / "pipeline.json").is_file()
