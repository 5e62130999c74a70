"""Distillation on the analytic mixture: each method does what its paper says against the exact ODE,
resume is bit-exact mid-distillation, and a teacher a method cannot use is refused with the reason."""

from __future__ import annotations

import warnings

import pytest
import torch

from difflab import processes, samplers
from difflab.analytic import GaussianMixture
from difflab.metrics.ode_error import straightness
from difflab.models import from_config as network_from_config
from difflab.pipeline import Pipeline
from difflab.training import config as train_config
from difflab.training import distill
from difflab.training.config import ConfigError
from difflab.training.distill.progressive import step_target
from difflab.training.distill.teacher import Teacher, ddim_step

MIX = GaussianMixture.ring(num_components=8, std=0.08, num_classes=4)
FLOW = processes.Flow()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe(tmp_path, method: str, steps: int, *extra: str) -> dict:
    """A distillation of the exact ring mixture into a small MLP (the toy data is that mixture's samples)."""
    return train_config.load(None, [
        f"out_dir='{tmp_path / method}'", "data.name='toy2d'", "data.options={kind='mixture', n=4096}",
        "data.batch_size=128", "model={kind='mlp', hidden=64, depth=3}", "prediction='flow'", "process={kind='flow'}",
        f"train.steps={steps}", "train.checkpoint_every=100000", "train.tensorboard=false", "optim.lr=1e-3",
        "optim.warmup_steps=20", "ema.decay=0.99", "loss.cond_dropout=0.0", f"distill.method='{method}'", *extra])


def exact_teacher() -> Teacher:
    return Teacher(MIX.denoiser(FLOW), FLOW)


def probe(n: int = 256):
    """Start noise, classes, and the exact ODE end points from them."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    labels = torch.arange(n) % 4
    return z, labels, MIX.ode_solve(z, FLOW, 1.0, labels=labels)


def rmse(a, b) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def one_step_error(student, z, labels, ref) -> float:
    x0 = student(z.float(), torch.tensor(1.0), class_labels=labels)
    return rmse(x0, ref)


def test_consistency_distillation_one_step_map_approaches_the_exact_ode_end_point(tmp_path):
    z, labels, ref = probe()
    run = distill.trainer(recipe(tmp_path, "consistency", 1000, "distill.options={steps_start=8, steps_end=32}"),
                          teacher=exact_teacher(), progress=False)
    errors = {}
    for record in run.steps():
        if record["step"] in (100, 1000):
            with torch.no_grad():
                errors[record["step"]] = one_step_error(run.pipeline(use_ema=False).denoiser(), z, labels, ref)
    exact_one_step = rmse(samplers.sample(MIX.denoiser(FLOW), z, "dpmpp_2m", 1, "karras",
                                          cond={"class_labels": labels}), ref)
    assert errors[1000] < 0.6 * errors[100], errors
    assert errors[1000] < 0.5 * exact_one_step, (errors, exact_one_step)  # the teacher's own best 1-step is worse


def test_consistency_training_needs_no_teacher(tmp_path):
    z, labels, ref = probe()
    student, _ = distill.run(recipe(tmp_path, "consistency", 600, "distill.options={target='data', steps_start=8, "
                                    "steps_end=32}"), progress=False)
    assert student.student == {"method": "consistency", "sampler": "consistency", "steps": []}
    exact_one_step = rmse(samplers.sample(MIX.denoiser(FLOW), z, "euler", 1, "trailing",
                                          cond={"class_labels": labels}), ref)
    with torch.no_grad():
        assert one_step_error(student.pipeline().denoiser(), z, labels, ref) < 0.8 * exact_one_step


def test_progressive_student_step_equals_two_teacher_steps(tmp_path):
    teacher = exact_teacher()
    student, _ = distill.run(recipe(tmp_path, "progressive", 300, "distill.options={start_steps=4, end_steps=1}"),
                             teacher=teacher, progress=False)
    assert [p.name for p in sorted((tmp_path / "progressive").glob("round_*"))] == ["round_0", "round_1"]
    pipe = student.pipeline()
    assert (pipe.sampler, pipe.steps, pipe.schedule) == ("ddim", 1, "trailing")
    # the last round: the student's one step 1 -> 0 against its teacher's (round 0's student) two steps
    teacher = Teacher.from_pipeline(Pipeline.from_pretrained(tmp_path / "progressive" / "round_0" / "final"))
    teacher.denoiser = teacher.denoiser.double()
    fine = torch.linspace(1, 0, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x0 = MIX.sample(512, generator=gen, labels=torch.arange(512) % 4).double()
    labels = torch.arange(512) % 4
    den = pipe.denoiser().double()
    for i in (0,):
        t, mid, s = (fine[2 * i + k].expand(512) for k in range(3))
        a = lambda u: teacher.scales(u, x0)  # noqa: E731
        x_t = a(t)[0] * x0 + a(t)[1] * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        z_mid = ddim_step(x_t, teacher(x_t, t, class_labels=labels), *a(t), *a(mid))
        two = ddim_step(z_mid, teacher(z_mid, mid, class_labels=labels), *a(mid), *a(s))
        one = ddim_step(x_t, teacher(x_t, t, class_labels=labels), *a(t), *a(s))
        with torch.no_grad():
            student_step = ddim_step(x_t, den(x_t, t, class_labels=labels), *a(t), *a(s))
        assert rmse(student_step, two) < 0.25 * rmse(one, two), (i, rmse(student_step, two), rmse(one, two))
        # the regression target is exactly the x0 that makes one DDIM step land on the two steps' end
        target = step_target(x_t, two, *a(t), *a(s))
        assert rmse(ddim_step(x_t, target, *a(t), *a(s)), two) < 1e-12


def test_reflow_straightens_the_paths_and_keeps_the_coupling(tmp_path):
    z, labels, ref = probe()
    student, _ = distill.run(recipe(tmp_path, "reflow", 1000, "distill.options={pairs=2048, steps=16}",
                                    "loss.t_distribution='uniform'"), teacher=exact_teacher(), progress=False)
    assert (tmp_path / "reflow" / "pairs.safetensors").is_file()
    den = student.pipeline().denoiser()
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(9))
    before = straightness(MIX.denoiser(FLOW), noise.double(), cond={"class_labels": labels})
    after = straightness(den, noise, cond={"class_labels": labels})
    assert after < 0.1 * before, (before, after)
    with torch.no_grad():  # one Euler step of the straightened flow lands near the exact ODE end point
        one = rmse(samplers.sample(den, z.float(), "euler", 1, "trailing", cond={"class_labels": labels}), ref)
    teacher_one = rmse(samplers.sample(MIX.denoiser(FLOW), z, "euler", 1, "trailing",
                                       cond={"class_labels": labels}), ref)
    assert one < 0.4 * teacher_one, (one, teacher_one)


def test_instaflow_student_is_one_step(tmp_path):
    z, labels, ref = probe()
    student, _ = distill.run(recipe(tmp_path, "instaflow", 600, "distill.options={pairs=2048, steps=16}"),
                             teacher=exact_teacher(), progress=False)
    pipe = student.pipeline()
    assert (pipe.sampler, pipe.steps) == ("euler", 1)
    teacher_one = rmse(samplers.sample(MIX.denoiser(FLOW), z, "euler", 1, "trailing",
                                       cond={"class_labels": labels}), ref)
    with torch.no_grad():
        assert one_step_error(pipe.denoiser(), z, labels, ref) < 0.4 * teacher_one


@pytest.mark.parametrize("method, options", [("consistency", "{steps_start=4, steps_end=16}"),
                                             ("reflow", "{pairs=512, steps=4}"),
                                             ("dmd2", "{steps=2, fake_updates=2}"),
                                             ("dmd2", "{steps=1, fake_updates=2, gan_weight=0.01}"),
                                             ("ladd", "{steps=2}")])
def test_resume_mid_distillation_is_bit_exact(tmp_path, method, options):
    def final_weights(out: str, stop: int | None) -> dict:
        cfg = recipe(tmp_path, method, 12, f"distill.options={options}", f"out_dir='{tmp_path / out}'",
                     "train.checkpoint_every=6")
        if stop is None:
            run, _ = distill.run(cfg, teacher=exact_teacher(), progress=False)
        else:
            first = distill.trainer(cfg, teacher=exact_teacher(), progress=False)
            for record in first.steps():
                if record["step"] == stop:
                    break
            run, _ = distill.run(cfg, teacher=exact_teacher(), progress=False, resume=True)
        return {k: v.clone() for k, v in run.model.state_dict().items()}

    whole, resumed = final_weights("whole", None), final_weights("resumed", 6)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def tiny_pipeline(tmp_path, process: processes.Process, prediction: str = "flow", **kw) -> str:
    net = network_from_config({"kind": "mlp", "dim": 2, "hidden": 16, "depth": 1, "num_classes": 4})
    pipe = Pipeline(net, process, prediction, sample_shape=(2,), num_classes=4, cond_dropout=0.1, **kw)
    return str(pipe.save_pretrained(tmp_path / f"teacher_{prediction}_{type(process).__name__}"))


def test_a_teacher_the_method_cannot_use_is_refused(tmp_path):
    vp = tiny_pipeline(tmp_path, processes.DiscreteVP.scaled_linear(), "v")
    x0 = tiny_pipeline(tmp_path, processes.Flow(), "x0")
    with pytest.raises(ConfigError, match="rectified-flow"):
        distill.trainer(train_config.load(None, [f"out_dir='{tmp_path / 'r'}'", "data.name='toy2d'",
                                                 "data.options={kind='mixture', n=64}", "distill.method='reflow'",
                                                 f"distill.teacher='{vp}'"]), progress=False)
    with pytest.raises(ConfigError, match="D\\(x, 0\\) = x"):
        distill.trainer(train_config.load(None, [f"out_dir='{tmp_path / 'c'}'", "data.name='toy2d'",
                                                 "data.options={kind='mixture', n=64}", "distill.method='consistency'",
                                                 f"distill.teacher='{x0}'"]), progress=False)
    with pytest.raises(ConfigError, match="leave \\[model\\] out"):
        distill.trainer(train_config.load(None, [f"out_dir='{tmp_path / 'm'}'", "data.name='toy2d'",
                                                 "data.options={kind='mixture', n=64}", "model={kind='mlp', hidden=8}",
                                                 "distill.method='progressive'", f"distill.teacher='{vp}'"]),
                        progress=False)
    with pytest.raises(ConfigError, match="powers of two"):
        distill.trainer(recipe(tmp_path, "progressive", 1, "distill.options={start_steps=6, end_steps=2}"),
                        teacher=exact_teacher(), progress=False)
    with pytest.raises(ConfigError, match="unknown shortcut"):
        distill.trainer(recipe(tmp_path, "consistency", 1, "distill.options={shortcut=1}"), teacher=exact_teacher())
    with pytest.raises(ConfigError, match="teacher's pipeline folder"):
        distill.trainer(train_config.load(None, ["distill.method='consistency'"]))


def test_a_vp_teacher_distils_progressively_from_its_pipeline(tmp_path):
    vp = tiny_pipeline(tmp_path, processes.DiscreteVP.scaled_linear(), "v")
    cfg = train_config.load(None, [f"out_dir='{tmp_path / 'p'}'", "data.name='toy2d'",
                                   "data.options={kind='mixture', n=64}",
                                   "data.batch_size=32", "train.steps=2", "train.tensorboard=false",
                                   "distill.method='progressive'", f"distill.teacher='{vp}'",
                                   "distill.options={start_steps=4, end_steps=2}"])
    distill.run(cfg, progress=False)
    pipe = Pipeline.from_pretrained(tmp_path / "p" / "final")
    assert pipe.process.to_config() == processes.DiscreteVP.scaled_linear().to_config()
    assert pipe.prediction.name == "v" and pipe.student["steps"] == [2]


def test_a_student_sampled_otherwise_warns(tmp_path):
    net = network_from_config({"kind": "mlp", "dim": 2, "hidden": 16, "depth": 1})
    pipe = Pipeline(net, FLOW, "flow", sample_shape=(2,), sampler="euler", steps=1, schedule="trailing",
                    student={"method": "instaflow", "sampler": "euler", "steps": [1]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(2)
    with pytest.warns(UserWarning, match="instaflow student trained for the 'euler' sampler at 1 step"):
        pipe(2, steps=8)
    with pytest.warns(UserWarning, match="sampling it with 'dpmpp_2m'"):
        pipe(2, sampler="dpmpp_2m", steps=1)
    again = Pipeline.from_pretrained(pipe.save_pretrained(tmp_path / "student"))
    assert again.student == pipe.student


def test_heun_teacher_step_is_second_order():
    teacher = exact_teacher()
    z, labels, _ = probe(128)
    x = z * 0.6 + 0.4 * MIX.sample(128, generator=torch.Generator().manual_seed(2), labels=labels).double()
    errors = {}
    for solver in ("euler", "heun"):
        errors[solver] = [rmse(teacher.step(x, torch.full((128,), 0.6, dtype=torch.float64),
                                            torch.full((128,), 0.6 - h, dtype=torch.float64), solver,
                                            class_labels=labels), MIX.ode_solve(x, FLOW, 0.6, 0.6 - h, labels=labels))
                          for h in (0.1, 0.05)]
    assert errors["euler"][0] / errors["euler"][1] == pytest.approx(4, rel=0.35)  # error of one step ~ h^2
    assert errors["heun"][0] / errors["heun"][1] == pytest.approx(8, rel=0.35)  # ~ h^3
    assert errors["heun"][1] < 0.2 * errors["euler"][1]


def test_consistency_sampler_one_step_is_the_denoised_estimate():
    den = MIX.denoiser(FLOW)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = samplers.sample(den, z, "consistency", 1, "trailing")
    assert torch.equal(out, den(z, 1.0))
    # two steps: D at t = 1, noised afresh to t = 0.5, D again
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    two = samplers.sample(den, z, "consistency", 2, "trailing", generator=g1)
    noise = torch.randn(z.shape, generator=g2, dtype=torch.float64)
    assert torch.allclose(two, den(0.5 * den(z, 1.0) + 0.5 * noise, 0.5), atol=1e-12)


def test_shortcut_model_one_step_equals_two_half_steps_and_beats_plain_flow(tmp_path):
    z, labels, ref = probe()
    student, _ = distill.run(recipe(tmp_path, "shortcut", 1000, "distill.options={max_steps=16}",
                                    "loss.cond_dropout=0.0"), progress=False)
    pipe = student.pipeline()
    assert (pipe.sampler, pipe.schedule, pipe.steps) == ("euler", "trailing", 1)
    assert pipe.student["steps"] == [1, 2, 4, 8, 16]
    assert torch.equal(pipe(4, seed=0, class_labels=labels[:4]).images,  # the pipeline passes the step size
                       samplers.sample(pipe.denoiser(), torch.stack([torch.randn(2, generator=torch.Generator()
                                                                                .manual_seed(i)) for i in range(4)]),
                                       "euler", 1, "trailing", cond={"class_labels": labels[:4],
                                                                     "step_size": torch.ones(4)}).clamp(-1, 1))
    with torch.no_grad():
        errors = {k: rmse(samplers.sample(pipe.denoiser(), z.float(), "euler", k, "trailing",
                                         cond={"class_labels": labels, "step_size": torch.full((256,), 1.0 / k)}), ref)
                  for k in (1, 2, 16)}
        plain = rmse(samplers.sample(pipe.denoiser(), z.float(), "euler", 1, "trailing",
                                     cond={"class_labels": labels, "step_size": torch.zeros(256)}), ref)
    assert errors[1] < 0.5 * plain, (errors, plain)  # the step-size input is what makes one step work
    assert errors[16] < 0.2  # and the model is still a flow at fine steps
    with pytest.raises(Exception, match="schedule='trailing'"):
        pipe(2, schedule="karras")


def test_a_step_size_embedding_starts_from_the_teachers_network_unchanged():
    torch.manual_seed(0)
    for kind in ({"kind": "mlp", "dim": 2, "hidden": 16, "depth": 2, "num_classes": 4},
                 {"kind": "unet", "in_channels": 1, "model_channels": 16, "channel_mult": [1], "num_res_blocks": 1,
                  "attention_levels": [], "norm_groups": 8, "num_classes": 4}):
        plain = network_from_config(kind)
        for p in plain.parameters():  # outputs that are not zero-initialised, so equality means something
            torch.nn.init.normal_(p, std=0.1)
        shortcut = network_from_config({**kind, "step_size_embedding": True})
        assert shortcut.load_widened(plain.state_dict()) == []
        x = torch.randn(3, 2) if kind["kind"] == "mlp" else torch.randn(3, 1, 8, 8)
        t, labels = torch.tensor([100.0, 500.0, 900.0]), torch.tensor([0, 1, -1])
        for d in (None, torch.full((3,), 0.5)):
            assert torch.equal(shortcut(x, t, class_labels=labels, step_size=d), plain(x, t, class_labels=labels))
        with pytest.raises(ValueError, match="takes no step_size"):
            plain(x, t, class_labels=labels, step_size=torch.ones(3))


def test_latent_consistency_student_carries_the_guidance_scale(tmp_path):
    def null(cond):
        return {**cond, "class_labels": torch.full_like(cond["class_labels"], -1)}

    teacher = Teacher(MIX.denoiser(FLOW), FLOW, null=null)
    student, _ = distill.run(recipe(tmp_path, "consistency", 800, "loss.cond_dropout=0.1",
                                    "distill.options={steps_start=8, steps_end=32, skip=2, guidance_range=[1.0, 4.0]}"),
                             teacher=teacher, progress=False)
    pipe = student.pipeline()
    assert pipe.network.config.guidance_embedding and pipe.guidance == {"method": "cfg", "options": {"scale": 2.5}}
    z, labels, _ = probe()
    refs = {w: samplers.sample(Teacher(MIX.denoiser(FLOW), FLOW, scale=w, null=null), z, "dpmpp_2m", 64, "karras",
                               cond={"class_labels": labels}) for w in (1.0, 4.0)}
    with torch.no_grad():
        outs = {w: samplers.sample(pipe.denoiser(), z.float(), "consistency", 1, "trailing",
                                   cond={"class_labels": labels, "guidance_scale": torch.full((256,), w)})
                for w in (1.0, 4.0)}
    # what guidance changes in the guided ODE's end points, the scale input changes in one step
    change, wanted = outs[4.0] - outs[1.0], refs[4.0] - refs[1.0]
    assert rmse(change, wanted) < 0.5 * rmse(wanted, 0 * wanted), (rmse(change, wanted), rmse(wanted, 0 * wanted))
    # the pipeline turns cfg into the input: one evaluation per image, the same images
    out = pipe(4, seed=0, class_labels=labels[:4], guidance="cfg", guidance_options={"scale": 4.0})
    assert out.settings[0]["denoiser_calls"] == 1
    noise = torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    with torch.no_grad():
        direct = samplers.sample(pipe.denoiser(), noise, "consistency", 1, "trailing",
                                 cond={"class_labels": labels[:4], "guidance_scale": torch.full((4,), 4.0)})
    assert torch.equal(out.images, direct.clamp(-1, 1))


def test_dmd2_generator_moves_toward_the_data_distribution_and_covers_every_mode(tmp_path):
    labels = torch.arange(2000) % 4

    def log_density(x):
        return float(MIX.log_density(x.double(), 1.0, 1e-3, labels=labels).mean())

    run = distill.trainer(recipe(tmp_path, "dmd2", 600, "distill.options={steps=1, fake_lr=1e-3, fake_updates=3}"),
                          teacher=exact_teacher(), progress=False)
    assert run.student == {"method": "dmd2", "sampler": "consistency", "steps": [1]}
    quality = {}
    for record in run.steps():
        if record["step"] in (100, 600):
            x = run.pipeline(use_ema=False)(2000, class_labels=labels).images
            angle = torch.atan2(x[:, 1], x[:, 0])
            modes = torch.bincount(((angle / (torch.pi / 4)).round() % 8).long(), minlength=8)
            quality[record["step"]] = (log_density(x), modes)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    teacher_one = samplers.sample(MIX.denoiser(FLOW), noise, "euler", 1, "trailing", cond={"class_labels": labels})
    (early, _), (late, modes) = quality[100], quality[600]
    assert late > early + 0.5 and late > log_density(teacher_one) + 1.0, (early, late, log_density(teacher_one))
    assert int(modes.min()) > 150, modes  # every one of the 8 modes keeps most of its 250 samples: no collapse


def test_dmd2_gan_head_tells_data_from_samples_off_it_and_the_generator_still_covers_every_mode(tmp_path):
    labels = torch.arange(2000) % 4
    run = distill.trainer(recipe(tmp_path, "dmd2", 400, "distill.options={steps=1, fake_lr=1e-3, fake_updates=3, "
                                 "gan_weight=0.05, gan_fake_weight=0.1}"), teacher=exact_teacher(), progress=False)
    head = run.objective.head
    assert head is not None and head.block == run.model.block_names()[len(run.model.block_names()) // 2]
    for _ in run.steps():
        pass
    x = run.pipeline(use_ema=False)(2000, class_labels=labels).images
    angle = torch.atan2(x[:, 1], x[:, 0])
    modes = torch.bincount(((angle / (torch.pi / 4)).round() % 8).long(), minlength=8)
    assert int(modes.min()) > 150, modes
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    teacher_one = samplers.sample(MIX.denoiser(FLOW), noise, "euler", 1, "trailing", cond={"class_labels": labels})
    density = float(MIX.log_density(x.double(), 1.0, 1e-3, labels=labels).mean())
    assert density > float(MIX.log_density(teacher_one, 1.0, 1e-3, labels=labels).mean()) + 1.0

    from difflab.training.distill.dmd import capturing

    def logit(points):  # the head's mean logit on points noised to t = 0.3
        seen: list = []
        t = torch.full((len(points),), 0.3)
        capturing(run.objective.fake, head.block, seen)(0.7 * points.float() + 0.3 * noise.float(), t,
                                                        class_labels=labels)
        return float(head(seen[-1]).mean())

    with torch.no_grad():
        data = MIX.sample(2000, generator=torch.Generator().manual_seed(3), labels=labels)
        shrunk = 0.6 * data  # a generator that misses the ring
        assert logit(data) > logit(shrunk) + 0.5, (logit(data), logit(shrunk))


def test_ladd_heads_on_the_frozen_teachers_features_pull_a_one_step_student_onto_the_data(tmp_path):
    from difflab.training.trainer import Trainer

    base = Trainer(train_config.load(None, [
        f"out_dir='{tmp_path / 'base'}'", "data.name='toy2d'", "data.options={kind='mixture', n=4096}",
        "data.batch_size=128", "model={kind='mlp', hidden=64, depth=3}", "process={kind='flow'}", "prediction='flow'",
        "train.steps=1000", "train.checkpoint_every=100000", "train.tensorboard=false", "optim.lr=2e-3",
        "optim.warmup_steps=20", "ema.decay=0.99"]), overwrite=True)
    base.run(progress=False)
    teacher_path = base.pipeline().save_pretrained(tmp_path / "teacher")
    cfg = recipe(tmp_path, "ladd", 800, "distill.options={steps=1, head_lr=5e-4}", f"distill.teacher='{teacher_path}'",
                 "optim.lr=5e-5")
    cfg["model"] = {"kind": "mlp"}  # the teacher's network, from its folder
    run = distill.trainer(cfg, progress=False)
    assert run.student == {"method": "ladd", "sampler": "consistency", "steps": [1]}
    features = run.objective.features
    assert [h.block for h in run.objective.heads] == features.block_names()  # a head on every teacher block
    assert not any(p.requires_grad for p in features.parameters())
    for _ in run.steps():
        pass
    teacher = Pipeline.from_pretrained(teacher_path)
    assert all(torch.equal(a, b) for a, b in zip(teacher.network.state_dict().values(),
                                                 features.state_dict().values(), strict=True))  # never trained

    labels = torch.arange(2000) % 4

    def log_density(x):
        return float(MIX.log_density(x.double(), 1.0, 1e-3, labels=labels).mean())

    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # one evaluation each, unclamped
        x = samplers.sample(run.pipeline(use_ema=False).denoiser(), noise, "consistency", 1, "trailing",
                            cond={"class_labels": labels})
        teacher_one = samplers.sample(teacher.denoiser(), noise, "euler", 1, "trailing", cond={"class_labels": labels})
    assert log_density(x) > log_density(teacher_one) + 2.0, (log_density(x), log_density(teacher_one))
    angle = torch.atan2(x[:, 1], x[:, 0])
    modes = torch.bincount(((angle / (torch.pi / 4)).round() % 8).long(), minlength=8)
    assert int(modes.min()) > 0, modes  # sharper, with every mode still drawn (their balance is not promised)

    def logit(points):  # the heads' summed mean logit on points noised to t = 0.3
        t = torch.full((len(points),), 0.3)
        return float(sum(v.mean() for v in run.objective.logits(0.7 * points + 0.3 * noise, t, class_labels=labels)))

    with torch.no_grad():  # the heads rank data above the student's samples and the blurred ones it started from
        data = MIX.sample(2000, generator=torch.Generator().manual_seed(3), labels=labels).float()
        assert logit(data) > max(logit(teacher_one), logit(x)) + 0.1, (logit(data), logit(teacher_one), logit(x))


def test_perflow_one_euler_step_per_window_follows_the_teacher(tmp_path):
    z, labels, ref = probe()
    student, _ = distill.run(recipe(tmp_path, "perflow", 600, "distill.options={windows=2, solver_steps=8}"),
                             teacher=exact_teacher(), progress=False)
    pipe = student.pipeline()
    assert (pipe.sampler, pipe.steps, pipe.student["steps"]) == ("euler", 2, [2])
    teacher_two = rmse(samplers.sample(MIX.denoiser(FLOW), z, "euler", 2, "trailing",
                                       cond={"class_labels": labels}), ref)
    with torch.no_grad():
        two = rmse(samplers.sample(pipe.denoiser(), z.float(), "euler", 2, "trailing", cond={"class_labels": labels}),
                   ref)
    # straightened within each window: better than the teacher's own Euler steps (crossing paths keep it from exact)
    assert two < 0.8 * teacher_two, (two, teacher_two)


def test_a_text_teacher_guides_with_the_empty_prompt_encoded_once():
    from types import SimpleNamespace

    calls = []

    class Encoder:
        def null(self, batch):
            calls.append(batch)
            return {"context": torch.zeros(batch, 3, 4), "context_mask": torch.ones(batch, 3, dtype=torch.bool)}

    def fake_denoiser(x, t, context, context_mask):  # what a text-conditional network's x0 would be
        return x * (1 + context.mean(dim=(1, 2))[:, None])

    pipe = SimpleNamespace(network=torch.nn.Linear(1, 1), process=FLOW, num_classes=None,
                           text_encoder_config={"name": "test"}, text_encoder=Encoder,
                           denoiser=lambda: fake_denoiser)
    teacher = Teacher.from_pipeline(pipe, scale=3.0)
    x = torch.randn(5, 2)
    cond = {"context": torch.full((5, 3, 4), 0.5), "context_mask": torch.ones(5, 3, dtype=torch.bool)}
    for _ in range(2):
        out = teacher(x, torch.full((5,), 0.5), **cond)
    assert torch.allclose(out, 1.5 * x + 2.0 * (1.5 * x - x))  # d_cond + (w - 1)(d_cond - d_null)
    assert calls == [1]  # encoded once, not on every teacher call


def test_lcm_lora_one_step_map_approaches_the_exact_ode_end_point_on_a_frozen_base(tmp_path):
    """LCM-LoRA: the trained base is its own teacher; the LoRA alone learns, the base keeps every
    weight bit for bit, and with the LoRA one evaluation lands near the exact ODE end point."""
    from difflab.adapters import LoRA
    from difflab.adapters.lora import applied
    from difflab.training.adapters import train_consistency_lora
    from difflab.training.trainer import Trainer

    base_recipe = train_config.load(None, [
        f"out_dir='{tmp_path / 'base'}'", "data.name='toy2d'", "data.options={kind='mixture', n=4096}",
        "data.batch_size=128", "model={kind='mlp', hidden=64, depth=3}", "prediction='flow'", "process={kind='flow'}",
        "train.steps=1000", "train.checkpoint_every=100000", "train.tensorboard=false", "optim.lr=2e-3",
        "optim.warmup_steps=20", "ema.decay=0.99"])
    base = Trainer(base_recipe)
    base.run(progress=False)
    pipe = base.pipeline()
    z, labels, ref = probe()
    den = pipe.denoiser()
    with torch.no_grad():
        base_one_step = one_step_error(den, z, labels, ref)
    weights = {k: v.clone() for k, v in pipe.network.state_dict().items()}
    classes = torch.arange(4096) % 4
    data = MIX.sample(4096, generator=torch.Generator().manual_seed(1), labels=classes)
    lora = train_consistency_lora(pipe, data, labels=classes, steps=600, batch_size=128, lr=2e-3, steps_start=8,
                                  steps_end=32, progress=False)
    assert all(torch.equal(weights[k], v) for k, v in pipe.network.state_dict().items())
    with torch.no_grad(), applied(pipe.network, lora):
        lora_one_step = one_step_error(den, z, labels, ref)
    assert lora_one_step < 0.35 * base_one_step, (lora_one_step, base_one_step)
    again = LoRA.from_pretrained(lora.save_pretrained(tmp_path / "lcm", pipe.identity()), pipe.network,
                                 base_identity=pipe.identity())
    assert again.student == lora.student == {"method": "lcm-lora", "sampler": "consistency", "steps": []}
    kw = {"seeds": list(range(64)), "class_labels": [0, 1, 2, 3] * 16, "guidance": "none", "schedule": "trailing"}

    def off_the_ring(images):  # mean distance to the nearest component's centre
        return float(torch.cdist(images.double(), MIX.means.double()).min(1).values.mean())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distilled = pipe(loras=[(again, 1.0)], sampler="consistency", steps=1, **kw).images
    plain = pipe(sampler="euler", steps=1, **kw).images
    assert off_the_ring(distilled) < 0.5 * off_the_ring(plain), (off_the_ring(distilled), off_the_ring(plain))
    with pytest.warns(UserWarning, match="lcm-lora student"):
        pipe(loras=[(again, 1.0)], sampler="euler", steps=2, **kw)
