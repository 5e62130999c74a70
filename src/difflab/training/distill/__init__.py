"""Distillation to few steps on the common trainer: a training recipe with a ``[distill]`` section.

``method`` is one of :data:`METHODS`; ``teacher`` a pipeline folder. The student takes the
teacher's network (as its initial weights), process, prediction, text encoder and VAE, so a recipe
names only the data (whose conditions the student learns on), the method's options and the
training budget. The loop is :class:`~difflab.training.trainer.Trainer` with the method's objective:
exact resume, EMA, checkpoints and DDP come with it, and every objective keeps no state of its own.
The exported pipeline's default sampler is the student's own, and its ``student`` record makes
sampling it otherwise warn.

- ``progressive`` (Salimans & Ho 2022): rounds, each halving the DDIM steps; options
  ``start_steps`` (the teacher's, default 32) and ``end_steps`` (default 4). Round k lives in
  ``OUT_DIR/round_k``; ``OUT_DIR/final`` is the last round's student.
- ``consistency`` (Song et al. 2023; Song & Dhariwal 2023): options ``target`` (``"teacher"``:
  distillation with the teacher's ``solver``, ``"data"``: consistency training), ``schedule``,
  ``steps_start`` / ``steps_end`` (the discretisation curriculum), ``huber_c``; LCM's (Luo et al.
  2023) ``skip`` (grid points per teacher step) and ``guidance_range = [w_min, w_max]`` (the student
  gets a guidance-scale input and its pipeline turns ``cfg`` into that input: one evaluation per step).
- ``shortcut`` (Frans et al. 2024): a network conditioned on the step size, from scratch or from a
  rectified-flow teacher's weights (no teacher outputs are used); options ``max_steps`` (a power of
  two: the finest step) and ``consistency_fraction``. Samples with 1, 2, 4, ... ``max_steps`` Euler steps.
- ``dmd2`` (Yin et al. 2024): a ``steps``-step generator (the consistency sampler's rollout) pulled
  by the teacher's and a fake denoiser's difference; the fake network (from the teacher's weights)
  takes ``fake_updates`` steps at ``fake_lr`` per generator step and is checkpointed with it; more
  than one step trains on the student's own rollouts (backward simulation). ``gan_weight`` > 0 adds
  DMD2's GAN head on the fake network's ``gan_block`` features (the middle block by default),
  trained at ``gan_fake_weight`` with the fake network and checkpointed with it. One process only.
- ``ladd`` (Sauer et al. 2024): a ``steps``-step student trained only adversarially: heads on the
  frozen teacher network's ``gan_blocks`` (all its blocks by default) tell noised data from noised
  student samples (hinge loss, ``head_lr``), at logit-normal times (``t_mean``, ``t_std``); a
  multi-step student's input is data noised to its grid point. An analytic teacher has no network:
  the student's initial one stands in. Heads checkpointed with the student. One process only.
- ``perflow`` (Yan et al. 2024): ``windows`` pieces of time, each straightened between a data
  sample noised to its start and the teacher's ODE (``solver_steps`` of ``solver``) to its end;
  samples with one Euler step per window.
- ``reflow`` (Liu et al. 2023) and ``instaflow`` (Liu et al. 2024): options ``pairs`` (how many
  noise/sample pairs the teacher makes, once, kept in ``OUT_DIR/pairs.safetensors``),
  ``sampler`` / ``steps`` / ``schedule`` (the teacher's deterministic sampler). Rectified-flow
  teachers only.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflab import predictions, processes, schedules
from difflab.denoiser import Denoiser
from difflab.files import load_tensors, read_json, save_tensors, write_json
from difflab.registry import Registry
from difflab.training.config import DEFAULTS, ConfigError
from difflab.training.distill.consistency import ConsistencyObjective
from difflab.training.distill.dmd import DMDObjective, GANHead
from difflab.training.distill.ladd import LADDObjective
from difflab.training.distill.perflow import PiecewiseReflowObjective
from difflab.training.distill.progressive import ProgressiveObjective
from difflab.training.distill.reflow import PairedObjective, teacher_pairs
from difflab.training.distill.shortcut import ShortcutObjective
from difflab.training.distill.teacher import SOLVERS, Teacher
from difflab.training.trainer import Trainer

Tensor = torch.Tensor


@dataclass(frozen=True)
class Method:
    """A distillation method: its options with their defaults (others are refused), the sampler and
    schedule its student is made for (None: the recipe's), how many steps that student takes by
    default (``student_steps(opts)``, None: the recipe's), whether it needs a teacher's outputs and
    whether it needs rectified flow, and ``objective(run, teacher, opts, progress)`` for a built
    trainer."""

    options: dict[str, Any]
    sampler: tuple[str, str] | None
    objective: Callable[[Trainer, Teacher | None, dict[str, Any], bool], Any]
    student_steps: Callable[[dict[str, Any]], int | None] = lambda opts: None
    needs_flow: bool = False
    uses_teacher: bool = True


METHODS: Registry[Method] = Registry("distillation method")


def _parts(run: Trainer) -> tuple[processes.Process, predictions.Prediction]:
    return run.process, run.prediction


def _consistency(run: Trainer, teacher: Teacher | None, opts: dict[str, Any], progress: bool) -> ConsistencyObjective:
    guided = tuple(float(w) for w in opts["guidance_range"]) or None
    return ConsistencyObjective(*_parts(run), teacher if opts["target"] == "teacher" else None,
                                int(run.config["train"]["steps"]), opts["schedule"], int(opts["steps_start"]),
                                int(opts["steps_end"]), opts["solver"],
                                None if opts["huber_c"] < 0 else float(opts["huber_c"]), int(opts["skip"]), guided)


def _paired(one_step: bool) -> Callable[[Trainer, Teacher | None, dict[str, Any], bool], PairedObjective]:
    def build(run: Trainer, teacher: Teacher | None, opts: dict[str, Any], progress: bool) -> PairedObjective:
        data_rows = torch.arange(int(opts["pairs"])) % len(run.x)  # each pair's condition: a data row's, in turn
        pairs = _pairs(run, teacher, opts, data_rows, progress)
        run.use_data(pairs["x0"], run.labels[data_rows] if run.num_classes else None,
                     run.text["index"][data_rows] if run.text is not None else None)
        return PairedObjective(*_parts(run), pairs["noise"], one_step=one_step,
                               weighting=run.config["loss"]["weighting"])

    return build


def _heads(run: Trainer, network: Any, blocks: list[str], option: str) -> list[GANHead]:
    """GAN heads on ``network``'s ``blocks`` (a default block for ""), sized by one pass on a data row."""
    probe = run.x[:1].to(run.device)
    cond = {"class_labels": run.labels[:1].to(run.device)} if run.num_classes else (
        run._conditions({"caption": run.text["index"][:1].to(run.device)}) if run.text is not None else {})
    x_in, t_in = Denoiser(network, *_parts(run)).network_inputs(probe, 0.5)
    try:
        return [GANHead.for_network(network, x_in, t_in, block, **cond).to(run.device) for block in blocks]
    except ValueError as err:
        raise ConfigError(f"distill.options.{option}: {err}") from err


def _dmd(run: Trainer, teacher: Teacher | None, opts: dict[str, Any], progress: bool) -> DMDObjective:
    if run.world > 1:
        raise ConfigError("dmd2's fake score network is trained inside the objective and is not averaged across "
                          "processes yet: run it in one process")
    fake = copy.deepcopy(run.model)  # the teacher's weights, like the student
    head = _heads(run, fake, [str(opts["gan_block"])], "gan_block")[0] if float(opts["gan_weight"]) > 0 else None
    return DMDObjective(teacher, *_parts(run), fake, steps=int(opts["steps"]), fake_updates=int(opts["fake_updates"]),
                        fake_lr=float(opts["fake_lr"]), head=head, gan_weight=float(opts["gan_weight"]),
                        gan_fake_weight=float(opts["gan_fake_weight"]))


def _ladd(run: Trainer, teacher: Teacher | None, opts: dict[str, Any], progress: bool) -> LADDObjective:
    if run.world > 1:
        raise ConfigError("ladd's discriminator heads are trained inside the objective and are not averaged across "
                          "processes yet: run it in one process")
    features = teacher.network if teacher is not None and teacher.network is not None else copy.deepcopy(run.model)
    features = features.to(run.device)
    if int(opts["steps"]) < 1:
        raise ConfigError(f"distill.options.steps must be >= 1, got {opts['steps']}")
    blocks = [str(b) for b in opts["gan_blocks"]] or features.block_names()
    return LADDObjective(features, *_parts(run), _heads(run, features, blocks, "gan_blocks"), steps=int(opts["steps"]),
                         head_lr=float(opts["head_lr"]), t_mean=float(opts["t_mean"]), t_std=float(opts["t_std"]))


PAIRS = {"pairs": 10000, "sampler": "heun", "steps": 10, "schedule": "karras", "batch_size": 256}
METHODS.add("progressive", Method(
    {"start_steps": 32, "end_steps": 4}, ("ddim", "trailing"),
    lambda run, teacher, opts, progress: ProgressiveObjective(teacher, *_parts(run), int(opts["round_steps"])),
    lambda opts: int(opts["round_steps"])),
    "Salimans & Ho 2022, Progressive Distillation for Fast Sampling of Diffusion Models")
METHODS.add("consistency", Method(
    {"target": "teacher", "solver": "heun", "schedule": "karras", "steps_start": 10, "steps_end": 80, "huber_c": -1.0,
     "skip": 1, "guidance_range": []}, ("consistency", "trailing"), _consistency),
    "Song et al. 2023, Consistency Models; Song & Dhariwal 2023 (iCT); Luo et al. 2023 (LCM)")
METHODS.add("reflow", Method(dict(PAIRS), None, _paired(one_step=False), needs_flow=True),
            "Liu et al. 2023, Flow Straight and Fast (2-rectified flow)")
METHODS.add("instaflow", Method(dict(PAIRS), ("euler", "trailing"), _paired(one_step=True), lambda opts: 1,
                                needs_flow=True),
            "Liu et al. 2024, InstaFlow (one-step distillation of a reflowed model)")
METHODS.add("perflow", Method(
    {"windows": 4, "solver_steps": 4, "solver": "heun"}, ("euler", "trailing"),
    lambda run, teacher, opts, progress: PiecewiseReflowObjective(teacher, *_parts(run), int(opts["windows"]),
                                                        int(opts["solver_steps"]), opts["solver"]),
    lambda opts: int(opts["windows"]), needs_flow=True), "Yan et al. 2024, PeRFlow (piecewise rectified flow)")
METHODS.add("shortcut", Method(
    {"max_steps": 128, "consistency_fraction": 0.25}, ("euler", "trailing"),
    lambda run, teacher, opts, progress: ShortcutObjective(*_parts(run), int(opts["max_steps"]),
                                                 float(opts["consistency_fraction"])),
    needs_flow=True, uses_teacher=False), "Frans et al. 2024, One Step Diffusion via Shortcut Models")
METHODS.add("dmd2", Method({"steps": 1, "fake_updates": 5, "fake_lr": 1e-4, "gan_weight": 0.0, "gan_fake_weight": 1e-2,
                            "gan_block": ""}, ("consistency", "trailing"), _dmd,
                           lambda opts: int(opts["steps"])),
            "Yin et al. 2024, Improved Distribution Matching Distillation (DMD2)")
METHODS.add("ladd", Method({"steps": 1, "head_lr": 2e-4, "gan_blocks": [], "t_mean": 0.0, "t_std": 1.0},
                           ("consistency", "trailing"), _ladd, lambda opts: int(opts["steps"])),
            "Sauer et al. 2024, Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation")


def options(config: dict[str, Any]) -> dict[str, Any]:
    """The method's options: its defaults under the recipe's, unknown keys refused."""
    method = config["distill"]["method"]
    if method not in METHODS:
        raise ConfigError(f"distill.method must be one of {', '.join(METHODS)}, got {method!r}")
    defaults = METHODS.get(method).options
    given = dict(config["distill"]["options"])
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"distill.options for {method}: unknown {', '.join(unknown)}; valid: {', '.join(defaults)}")
    return {**defaults, **given}


def _teacher_pipeline(path: str):
    from difflab.interop import open_pipeline
    from difflab.pipeline import PipelineError

    if not path:
        raise ConfigError("distill.teacher is empty: give the teacher's pipeline folder (e.g. outputs/digits/final)")
    try:
        return open_pipeline(path)
    except (PipelineError, OSError) as err:
        raise ConfigError(f"distill.teacher = {path!r}: {err}") from err


def _check_teacher(method: str, process: processes.Process, prediction: predictions.Prediction,
                   opts: dict[str, Any]) -> None:
    """Refuse a teacher the method cannot distil, with the reason."""
    if METHODS.get(method).needs_flow and not isinstance(process, processes.Flow):
        raise ConfigError(f"{method} straightens a rectified-flow model (x_t = (1 - t) x0 + t noise); the teacher's "
                          f"process is {process!r}. Distil it with progressive or consistency instead.")
    if method == "consistency" and prediction.name == "x0":
        raise ConfigError("consistency distillation needs D(x, 0) = x, which an x0-prediction network does not give; "
                          "use progressive, or a teacher with eps, v, flow or edm prediction")
    if method in ("consistency", "perflow") and opts["solver"] not in SOLVERS:
        raise ConfigError(f"distill.options.solver must be one of {', '.join(SOLVERS)}, got {opts['solver']!r}")
    if method == "consistency" and opts["target"] not in ("teacher", "data"):
        raise ConfigError(f"distill.options.target must be 'teacher' or 'data', got {opts['target']!r}")
    if method in ("shortcut", "perflow") and process.shift != 1.0:
        raise ConfigError(f"{method} takes straight steps in t, on rectified flow without a time shift; the "
                          f"process is {process!r}")
    if method == "progressive":
        start, end = int(opts["start_steps"]), int(opts["end_steps"])
        if end < 1 or start <= end or start & (start - 1) or end & (end - 1):
            raise ConfigError(f"progressive distillation halves the steps: start_steps ({start}) and end_steps "
                              f"({end}) must be powers of two with start > end >= 1")


def from_teacher(config: dict[str, Any], pipe: Any, path: str) -> dict[str, Any]:
    """The recipe completed from the teacher pipeline at ``path``: the student's network config,
    process, prediction, text encoder and VAE are the teacher's, and it starts from its weights. A
    recipe that sets them otherwise is refused: the student could not start from the teacher."""
    config = copy.deepcopy(config)
    teacher_parts = {"model": pipe.network.to_config(), "process": pipe.process.to_config(),
                     "prediction": pipe.prediction.to_config()}
    given_parts = {"model": config["model"], "process": processes.from_config(config["process"]).to_config(),
                   "prediction": predictions.get(config["prediction"]).to_config()}
    defaults = {"model": DEFAULTS["model"], "process": processes.from_config(DEFAULTS["process"]).to_config(),
                "prediction": predictions.get(DEFAULTS["prediction"]).to_config()}
    for key, value in teacher_parts.items():
        given = given_parts[key]
        if given != defaults[key] and any(json.dumps(v) != json.dumps(value.get(k)) for k, v in given.items()):
            raise ConfigError(f"the recipe's [{key}] differs from the teacher's; a distilled student takes the "
                              f"teacher's {key}: leave [{key}] out of a distillation recipe")
        config[key] = value
    if pipe.text_encoder_config is not None:
        config["text"] = {"encoder": pipe.text_encoder_config["name"],
                          "max_tokens": int(pipe.text_encoder_config.get("max_tokens", DEFAULTS["text"]["max_tokens"]))}
    if pipe.vae is not None:
        config["latent"] = {**config["latent"], "vae": str(Path(path) / "vae"), "train_steps": 0}
    if not config["train"]["init"]:
        config["train"]["init"] = str(path)
    return config


def _student_sampling(config: dict[str, Any], method: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``[sample]`` section set to the student's own sampler, schedule and steps."""
    config = copy.deepcopy(config)
    spec = METHODS.get(method)
    if spec.sampler is not None:
        config["sample"]["sampler"], config["sample"]["schedule"] = spec.sampler
    steps = spec.student_steps(opts)
    if steps is not None:
        config["sample"]["steps"] = steps
    elif method in ("consistency", "shortcut") and config["sample"]["steps"] == DEFAULTS["sample"]["steps"]:
        config["sample"]["steps"] = 1  # one evaluation, unless the recipe's [sample] asks for more
    return config


def _student_record(config: dict[str, Any], method: str, opts: dict[str, Any]) -> dict[str, Any] | None:
    """What the student's pipeline records of what it learned (None: nothing to warn about)."""
    s = config["sample"]
    if method == "reflow":  # a rectified flow again: any sampler, it is only straighter
        return None
    steps = [s["steps"]] if METHODS.get(method).student_steps(opts) is not None else []
    if method == "shortcut":
        finest = int(opts["max_steps"])
        steps = [2**k for k in range(finest.bit_length()) if 2**k <= finest]
    if method == "ladd":  # every step count whose grid is a subset of the one it learned on
        process, learned = processes.from_config(config["process"]), int(opts["steps"])
        grid = schedules.get("trailing", process, learned)[:-1]
        steps = [k for k in range(1, learned + 1) if all(torch.isclose(grid, t).any()
                                                          for t in schedules.get("trailing", process, k)[:-1])]
    return {"method": method, "sampler": s["sampler"], "steps": steps}


def trainer(config: dict[str, Any], *, teacher: Teacher | None = None, overwrite: bool = False,
            progress: bool = True, round_steps: int | None = None) -> Trainer:
    """The trainer of a distillation recipe. ``teacher``: a :class:`Teacher` to use instead of the
    recipe's pipeline (an analytic mixture in tests); the recipe then names the student's model,
    process and prediction itself. ``round_steps``: the student's steps of one progressive round."""
    method = config["distill"]["method"]
    opts = options(config)
    spec = METHODS.get(method)
    given = config["distill"]["teacher"]
    if method == "progressive":  # one round: its student's steps
        opts = {**opts, "round_steps": round_steps or int(opts["start_steps"]) // 2}
    if not spec.uses_teacher:  # a teacher's weights at most: the student is the same network
        config = from_teacher(config, _teacher_pipeline(given), given) if given else config
        teacher = None
    elif teacher is None and not (method == "consistency" and opts["target"] == "data" and not given):
        pipe = _teacher_pipeline(given)
        config = from_teacher(config, pipe, given)
        teacher = Teacher.from_pipeline(pipe, float(config["distill"]["guidance_scale"]))
    if method == "shortcut":
        config["model"] = {**config["model"], "step_size_embedding": True}
    if method == "consistency" and opts["guidance_range"]:
        if len(opts["guidance_range"]) != 2:
            raise ConfigError(f"distill.options.guidance_range must be [w_min, w_max], got {opts['guidance_range']}")
        config["model"] = {**config["model"], "guidance_embedding": True}
        config["sample"] = {**config["sample"], "guidance": "cfg",
                            "guidance_options": {"scale": sum(map(float, opts["guidance_range"])) / 2}}
    process = processes.from_config(config["process"])
    _check_teacher(method, process, predictions.get(config["prediction"]), opts)
    if teacher is not None and teacher.process.to_config() != process.to_config():
        raise ConfigError(f"the teacher's process ({teacher.process!r}) is not the student's ({process!r}); a student "
                          "distils a teacher on its own process")
    config = _student_sampling(config, method, opts)
    run = Trainer(config, overwrite=overwrite)
    run.student = _student_record(config, method, opts)
    run.objective = spec.objective(run, teacher, opts, progress)
    return run


def _pairs(run: Trainer, teacher: Teacher, opts: dict[str, Any], data_rows: Tensor,
           progress: bool) -> dict[str, Tensor]:
    """The teacher's (noise, sample) pairs, made once per run directory and read back on resume."""
    record = {"pairs": int(opts["pairs"]), "sampler": opts["sampler"], "steps": int(opts["steps"]),
              "schedule": opts["schedule"], "seed": int(run.config["seed"]), "shape": list(run.x.shape[1:])}
    path, meta = run.out / "pairs.safetensors", run.out / "pairs.json"
    if path.is_file() and meta.is_file() and read_json(meta, "reflow pairs record") == record:
        return load_tensors(path, "reflow pairs")
    def conditions(rows: Tensor) -> dict[str, Tensor]:
        if run.num_classes:
            return {"class_labels": run.labels[data_rows[rows]].to(run.device)}
        if run.text is not None:
            return run._conditions({"caption": run.text["index"][data_rows[rows]].to(run.device)})
        return {}

    pairs = teacher_pairs(teacher, tuple(run.x.shape[1:]), int(opts["pairs"]), conditions, sampler=opts["sampler"],
                          steps=int(opts["steps"]), schedule=opts["schedule"], seed=int(run.config["seed"]),
                          batch_size=int(opts["batch_size"]), device=run.device, progress=progress)
    if run.runtime.main:
        run.out.mkdir(parents=True, exist_ok=True)
        save_tensors(path, pairs)
        write_json(meta, record)
    return pairs


def run(config: dict[str, Any], *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        teacher: Teacher | None = None) -> tuple[Trainer, dict[str, Any]]:
    """Train the recipe's student to ``train.steps`` (per round for ``progressive``) and write
    ``OUT_DIR/final``. Returns the (last) trainer and its last record."""
    if config["distill"]["method"] != "progressive":
        student = trainer(config, teacher=teacher, overwrite=overwrite, progress=progress)
        return student, student.run(resume=resume, progress=progress)
    opts = options(config)
    out = Path(config["out_dir"])
    if overwrite:
        from difflab.files import claim_output
        from difflab.training.trainer import RUN_OUTPUTS

        claim_output(out, RUN_OUTPUTS, overwrite=True, what="run")
    source, steps, k = config["distill"]["teacher"], int(opts["start_steps"]) // 2, 0
    while True:
        round_config = copy.deepcopy(config)
        round_config["out_dir"] = str(out / f"round_{k}")
        round_config["distill"]["teacher"] = source
        round_config["train"]["init"] = source if k else config["train"]["init"]
        finished = (Path(round_config["out_dir"]) / "final" / "pipeline.json").is_file()
        if not (resume and finished) or steps == int(opts["end_steps"]):  # a resumed run skips finished rounds
            student = trainer(round_config, teacher=teacher if k == 0 else None, progress=progress,
                              round_steps=steps)
            started = (Path(round_config["out_dir"]) / "config.json").is_file()
            last = student.run(resume=resume and started, progress=progress)
        source, teacher = str(Path(round_config["out_dir"]) / "final"), None
        if steps == int(opts["end_steps"]):
            break
        steps, k = steps // 2, k + 1
    student.pipeline().save_pretrained(out / "final")
    return student, last
