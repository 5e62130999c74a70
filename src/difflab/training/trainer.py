"""The trainer: one loop for every network, process and prediction, resumable bit for bit.

It composes the parts that each own one idea: the seeded batch plan (``batches.py``: what makes
resume and DDP exact), the runtime (``setup.py``: device, DDP, mixed precision), the objective (a
loss object, :class:`~difflab.training.losses.DiffusionObjective` by default) and the parameters
it trains (all by default). :meth:`Trainer.steps` is the loop as a generator that hands each
step's record to its caller; :meth:`Trainer.run` attaches the logs (``logs.py``) and writes
``final/``. Distillation and adapter recipes reuse it with another objective and parameter choice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab import data as datasets
from difflab import predictions, processes
from difflab.files import claim_output, read_json, write_atomic
from difflab.models import from_config as network_from_config
from difflab.training import checkpoint
from difflab.training.batches import BatchPlan
from difflab.training.config import ConfigError, differences, validate
from difflab.training.ema import ema_model
from difflab.training.losses import DiffusionObjective, InpaintingObjective
from difflab.training.optim import adamw
from difflab.training.setup import setup

Tensor = torch.Tensor


class TrainingError(RuntimeError):
    pass


class DivergenceGuard:
    """Notices a run that is blowing up before its loss turns NaN: a step is "bad" when its gradient
    norm is not finite, or its loss or gradient norm exceeds ``factor`` times their running median
    (over the last 200 good steps, after 20 of them; the loss only against a positive median, since an
    adversarial loss lives around or below zero; not at all with ``watch_loss=False``, for an
    objective whose loss is a game's and swings by design); ``patience`` bad steps in a row stop the
    run (``mode="stop"``) or warn once (``"warn"``)."""

    def __init__(self, mode: str, factor: float, patience: int, watch_loss: bool = True):
        self.mode, self.factor, self.patience, self.watch_loss = mode, factor, patience, watch_loss
        self.history: list[tuple[float, float]] = []
        self.bad, self.warned = 0, False

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """A message when the run has diverged, else None."""
        if self.mode == "off":
            return None
        level = None
        if len(self.history) >= 20:
            losses, norms = zip(*self.history[-200:], strict=True)
            level = (sorted(losses)[len(losses) // 2], sorted(norms)[len(norms) // 2])
        bad = not math.isfinite(grad_norm) or (level is not None and (
            (self.watch_loss and level[0] > 0 and loss > self.factor * level[0])
            or grad_norm > self.factor * max(level[1], 1e-12)))
        if not bad:
            self.bad = 0
            self.history.append((loss, grad_norm))
            return None
        self.bad += 1
        if self.bad < self.patience:
            return None
        typical = f" (typical: loss {level[0]:.3g}, gradient norm {level[1]:.3g})" if level else ""
        return (f"training diverged at step {step}: {self.bad} steps in a row with loss {loss:.3g} and gradient "
                f"norm {grad_norm:.3g}{typical}")


def _stack(dataset) -> tuple[Tensor, Tensor | None, list[str] | None]:
    """All of a (small, built-in) dataset as tensors: images, labels, captions."""
    if hasattr(dataset, "x"):
        return dataset.x, getattr(dataset, "labels", None), None
    items = [dataset[i] for i in range(len(dataset))]
    x = torch.stack([it["x"] for it in items])
    labels = torch.tensor([it["label"] for it in items]) if "label" in items[0] else None
    captions = [it["caption"] for it in items] if "caption" in items[0] else None
    return x, labels, captions


def build_model(config: dict, sample: Tensor, num_classes: int | None, text_dim: int | None = None) -> nn.Module:
    cfg = dict(config["model"])
    kind = cfg.get("kind", "unet")
    if kind == "mlp":
        cfg.setdefault("dim", sample.shape[-1])
    else:
        cfg.setdefault("in_channels", sample.shape[0])
    if num_classes and "num_classes" not in cfg:
        cfg["num_classes"] = num_classes
    if text_dim:
        cfg.setdefault("context_dim", text_dim)
    try:
        return network_from_config(cfg)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"[model] section: {err}") from err


def _lr_lambda(optim: dict, total: int):
    warmup, kind = int(optim["warmup_steps"]), optim["schedule"]
    if kind not in ("cosine", "constant", "linear"):
        raise ConfigError(f"optim.schedule must be 'cosine', 'constant' or 'linear', got {kind!r}")

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress if kind == "linear" else 1.0

    return fn


def _logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl record; None for a line a killed run left half-written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _check_sampling(section: dict[str, Any]) -> None:
    """A recipe's ``[sample]`` section, checked before training (its sampler is used at the end)."""
    from difflab import guidance
    from difflab.samplers import SamplerSpec

    try:
        SamplerSpec(section["sampler"], section["steps"], section["schedule"])
        if section["guidance"] != "none":
            guidance.get(section["guidance"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"[sample] section: {err}") from err


#: what a run writes into its out_dir (removed first when a run is overwritten)
RUN_OUTPUTS = ("config.json", "metrics.jsonl", "checkpoints", "final", "samples", "tensorboard", "vae",
               "pairs.safetensors", "pairs.json", "round_*")


class Trainer:
    """``Trainer(config).run(resume=...)``; see :mod:`difflab.recipes` for the recipes.

    ``objective(net, batch, **cond) -> loss`` replaces the diffusion loss, and ``parameters(model)``
    chooses what trains (the rest is frozen): the hooks for recipes that reuse this loop."""

    def __init__(self, config: dict[str, Any], *,
                 objective: Callable[..., Tensor] | None = None,
                 parameters: Callable[[nn.Module], Iterable[nn.Parameter]] | None = None,
                 overwrite: bool = False):
        self.config = validate(config)
        _check_sampling(config["sample"])  # before anything is built or trained
        self.runtime = setup(config["train"])
        self.rank, self.world, self.device = self.runtime.rank, self.runtime.world, self.runtime.device
        self.out = Path(config["out_dir"])
        self._claimed = False  # this trainer has claimed out_dir for its run
        self._restarting = False  # resumed before any checkpoint: the earlier attempt is replaced
        self.student: dict[str, Any] | None = None  # a distilled model's record (set by distillation)
        if overwrite and self.runtime.main:  # an earlier run's files go before this one writes any
            claim_output(self.out, RUN_OUTPUTS, overwrite=True, what="run")
        data_cfg = config["data"]
        try:
            self.dataset = datasets.build(data_cfg["name"], **data_cfg["options"])
        except TypeError as err:
            raise ConfigError(f"[data.options] for {data_cfg['name']!r}: {err}") from err
        self.x, self.labels, captions = _stack(self.dataset)
        self.num_classes = getattr(self.dataset, "num_classes", None)
        self.text = self._text_tables(captions)
        if self.text is not None:
            self.num_classes, self.labels = None, None  # text replaces class labels
        self.vae = self._latents(progress=True)
        try:
            self.process = processes.from_config(config["process"])
        except (TypeError, KeyError, ValueError) as err:
            raise ConfigError(f"[process] section: {err}") from err
        self.prediction = predictions.get(config["prediction"])
        torch.manual_seed(config["seed"])
        text_dim = self.text["context"].shape[-1] if self.text is not None else None
        self.model = build_model(config, self.x[0], self.num_classes, text_dim).to(self.device)
        if config["train"]["init"]:
            self._initialise(config["train"]["init"])
        trained = list(parameters(self.model)) if parameters is not None else list(self.model.parameters())
        chosen = {id(p) for p in trained}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in chosen)
        self.trained = trained
        self.ema = ema_model(self.model, float(config["ema"]["decay"]), bool(config["ema"]["warmup"]))
        o = config["optim"]
        self.optimizer = adamw(trained, o["lr"], betas=(o["beta1"], o["beta2"]), weight_decay=o["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           _lr_lambda(o, int(config["train"]["steps"])))
        lcfg = config["loss"]
        try:
            self.plan = BatchPlan(len(self.x), int(data_cfg["batch_size"]), int(config["seed"]), int(o["accumulate"]),
                                  self.world, self.rank, lcfg["t_distribution"] or None, float(lcfg["cond_dropout"]),
                                  bool(lcfg["immiscible"]))
        except ValueError as err:
            raise ConfigError(f"[data] / [optim]: {err}") from err
        if objective is None and lcfg["task"] == "inpaint":
            if not getattr(self.model.config, "concat_channels", 0):
                raise ConfigError("loss.task = 'inpaint' needs a U-Net with model.concat_channels = "
                                  f"{1 + self.x.shape[1]} (the mask and the masked image)")
            objective = InpaintingObjective(self.process, self.prediction, lcfg["weighting"],
                                            float(lcfg["min_snr_gamma"]), float(lcfg["full_mask_rate"]))
        self.objective = objective or DiffusionObjective(self.process, self.prediction, lcfg["weighting"],
                                                         float(lcfg["min_snr_gamma"]))
        self.net = self.runtime.wrap(self.model)

    def _initialise(self, path: str) -> None:
        """Start from a trained network (``train.init``: a pipeline or network folder); input
        channels the new model adds (an inpainting model's) start at zero."""
        from difflab.files import load_tensors

        folder = Path(path) / "network" if (Path(path) / "network").is_dir() else Path(path)
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ConfigError(f"train.init = {path!r} holds no network weights ({weights} is missing)")
        try:
            widened = self.model.load_widened(load_tensors(weights, "network weights"))
        except ValueError as err:
            raise ConfigError(f"train.init = {path!r}: {err}; the [model] section must match the network "
                              "it starts from (besides added input channels)") from err
        self.initialised_from = {"path": str(path), "widened": widened}

    # --- conditioning and latents ------------------------------------------------------------------
    def _text_tables(self, captions: list[str] | None) -> dict[str, Any] | None:
        """Encode each distinct caption once: tables of context / mask / pooled, the empty caption last,
        and each sample's row."""
        tcfg = self.config["text"]
        if not tcfg["encoder"]:
            return None
        if captions is None:
            raise ConfigError(f"text.encoder is set but the {self.config['data']['name']!r} dataset has no captions")
        from difflab.models import conditioning

        encoder = conditioning.get(tcfg["encoder"], max_tokens=int(tcfg["max_tokens"]))
        distinct = sorted(set(captions))
        row = {c: i for i, c in enumerate(distinct)}
        tables = {key: value.to(self.device) for key, value in encoder([*distinct, ""]).items()}
        return {**tables, "index": torch.tensor([row[c] for c in captions]), "captions": distinct}

    def _latents(self, progress: bool):
        """Latent diffusion: train (or load) the VAE, then replace the images by their latents, once."""
        lcfg = self.config["latent"]
        if not lcfg["vae"] and not lcfg["train_steps"]:
            return None
        from difflab.models import Network
        from difflab.training.vae import encode_dataset, train_vae

        self.vae_folder = Path(lcfg["vae"]) if lcfg["vae"] else self.out / "vae"
        if lcfg["vae"]:
            vae = Network.from_pretrained(lcfg["vae"]).eval()
        elif self.world > 1 and not (self.out / "vae" / "model.safetensors").is_file():
            raise ConfigError("train the VAE in one process first (or set latent.vae): distributed runs only load one")
        else:
            vae = train_vae(self.x, self.out / "vae", steps=int(lcfg["train_steps"]),
                            batch_size=int(lcfg["batch_size"]), lr=float(lcfg["lr"]),
                            kl_weight=float(lcfg["kl_weight"]), seed=self.config["seed"],
                            progress=progress and self.rank == 0, **lcfg["model"])
        self.x = encode_dataset(vae, self.x)
        return vae

    def use_data(self, x: Tensor, labels: Tensor | None = None, caption_rows: Tensor | None = None) -> None:
        """Train on other samples than the dataset's (reflow: the teacher's), each with its class or
        its row of the caption tables; the batch plan follows the new size."""
        self.x = x
        if self.num_classes:
            self.labels = labels
        if self.text is not None:
            self.text = {**self.text, "index": caption_rows}
        self.plan = dataclasses.replace(self.plan, size=len(x))

    # --- one step's batch and loss ------------------------------------------------------------------
    def _batch(self, step: int, micro: int) -> dict[str, Tensor]:
        """This rank's share of the batch of (step, micro-step), on the device."""
        labels = self.labels if self.num_classes else None
        captions = self.text["index"] if self.text is not None else None
        batch = self.plan.draw(step, micro, self.process, self.x, labels, captions)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _conditions(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The network's condition inputs for a batch: class labels, or the caption rows' text tables."""
        if "caption" in batch:
            cond = {key: self.text[key][batch["caption"]] for key in ("context", "context_mask")}
            if getattr(self.model.config, "pooled_dim", None):
                cond["pooled"] = self.text["pooled"][batch["caption"]]
            return cond
        return {"class_labels": batch["labels"]} if "labels" in batch else {}

    def _auxiliary(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        """Networks and optimizers the objective trains itself (``objective.auxiliary()``: DMD2's
        fake score network), checkpointed and restored with the model."""
        parts = getattr(self.objective, "auxiliary", None)
        return parts() if callable(parts) else {}

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        with self.runtime.autocast():
            return self.objective(self.net, batch, **self._conditions(batch))

    # --- the loop -----------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the run's latest readable checkpoint (made with this config); returns its step. A
        damaged latest checkpoint (truncated, corrupt, incomplete) is passed over, with a warning,
        for the one before it."""
        from difflab.files import FileError

        found = checkpoint.all_checkpoints(self.out)
        if not found:  # killed before its first checkpoint (e.g. while training its VAE): start again
            saved = self.out / "config.json"
            if saved.is_file() and differences(read_json(saved, "run config"), self.config):
                raise ConfigError(f"--resume: {self.out} holds a run with another config and no checkpoint")
            warnings.warn(f"--resume: no checkpoint under {self.out / 'checkpoints'} yet; starting from step 0",
                          stacklevel=2)
            self._restarting = True
            return 0
        problems = []
        for ckpt in reversed(found):
            try:
                saved = checkpoint.read_record(ckpt)
                diff = differences(saved["config"], self.config)
                if diff:
                    raise ConfigError(f"checkpoint {ckpt} was made with another config; differing fields:\n  "
                                      + "\n  ".join(diff))
                step = checkpoint.load(ckpt, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                       scheduler=self.scheduler)["step"]
                checkpoint.load_auxiliary(ckpt, self._auxiliary())
            except (FileError, KeyError) as err:
                problems.append(f"{ckpt.name}: {err}")
                warnings.warn(f"checkpoint {ckpt} cannot be read ({err}); trying the one before", stacklevel=2)
                continue
            return step
        raise FileError(f"--resume: no readable checkpoint under {self.out / 'checkpoints'}:\n  "
                        + "\n  ".join(problems))

    def _open_run_directory(self, start: int) -> None:
        """Claim out_dir for this run, once: a new run (start 0) refuses a folder holding an earlier
        one, so two runs never mix."""
        if self._claimed:
            return
        earlier = [name for name in ("config.json", "metrics.jsonl", "checkpoints", "final")
                   if (self.out / name).exists()]
        # only the main process looks: the others would see the config.json it has just written
        if self.runtime.main and start == 0 and earlier and not self._restarting:
            raise ConfigError(f"{self.out} holds an earlier run ({', '.join(earlier)}); a new run would mix with it. "
                              "Continue it with --resume (resume=True), replace it with --overwrite "
                              "(Trainer(config, overwrite=True)), or choose another out_dir.")
        self._claimed = True
        if self.runtime.main and (self.out / "metrics.jsonl").is_file():  # records past the resumed step go
            kept = [line for line in (self.out / "metrics.jsonl").read_text().splitlines()
                    if _logged_step(line) is not None and _logged_step(line) <= start]
            write_atomic(self.out / "metrics.jsonl", "".join(line + "\n" for line in kept).encode())
        if self.runtime.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.config, indent=1))

    def steps(self, start: int = 0) -> Iterator[dict[str, Any]]:
        """The training loop from step ``start`` (see :meth:`resume`) as a generator: one record per
        optimizer step (step, loss, grad_norm, lr, seconds), after that step's checkpoint (if due) is
        written. Stops on a non-finite loss."""
        cfg, tcfg = self.config, self.config["train"]
        total, accumulate = int(tcfg["steps"]), int(cfg["optim"]["accumulate"])
        self._open_run_directory(start)
        scaler, t0 = self.runtime.scaler, time.time()
        guard = DivergenceGuard(tcfg["divergence"], float(tcfg["divergence_factor"]), int(tcfg["divergence_patience"]),
                                watch_loss=not getattr(self.objective, "adversarial", False))
        self.model.train()
        for step in range(start, total):
            torch.manual_seed(cfg["seed"] * 7919 + step)  # dropout and any other global draws
            self.optimizer.zero_grad(set_to_none=True)
            total_loss = 0.0
            for micro in range(accumulate):
                loss = self._loss(self._batch(step, micro)) / accumulate
                if not torch.isfinite(loss):
                    good = checkpoint.latest(self.out)
                    raise TrainingError(
                        f"the loss is {float(loss.detach())} at step {step}; training stopped and nothing was "
                        f"overwritten. Last good checkpoint: {good or 'none'}. Lower optim.lr or set optim.grad_clip.")
                (scaler.scale(loss) if scaler else loss).backward()
                total_loss += float(loss.detach())
            if scaler:
                scaler.unscale_(self.optimizer)
            clip = float(cfg["optim"]["grad_clip"])
            grad_norm = float(nn.utils.clip_grad_norm_(self.trained, clip if clip > 0 else math.inf))
            if scaler:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.ema.update_parameters(self.model)
            done = step + 1
            diverged = guard.check(done, total_loss, grad_norm)
            if diverged and guard.mode == "stop":
                good = checkpoint.latest(self.out)
                raise TrainingError(f"{diverged}; training stopped and nothing was overwritten. Last good checkpoint: "
                                    f"{good or 'none'}. Lower optim.lr, set optim.grad_clip, or set "
                                    "train.divergence='warn' to go on.")
            if diverged and not guard.warned:
                guard.warned = True
                warnings.warn(diverged, stacklevel=2)
            if self.runtime.main and (done % tcfg["checkpoint_every"] == 0 or done == total):
                record = self.pipeline_config(checkpoint.path_of(self.out, done))
                files = {"pipeline.json": json.dumps(record, indent=1).encode(),
                         **checkpoint.auxiliary_files(self._auxiliary())}
                checkpoint.save(self.out, done, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                scheduler=self.scheduler, config=cfg, keep_last=tcfg["keep_last"], files=files)
            yield {"step": done, "loss": total_loss, "grad_norm": grad_norm,
                   "lr": self.scheduler.get_last_lr()[0], "seconds": round(time.time() - t0, 2)}

    def default_logs(self, start: int, progress: bool = True) -> list:
        """The logs a recipe's ``[train]`` section asks for: JSON lines, TensorBoard, a progress bar,
        preview grids. Only the main process logs."""
        from difflab.training import logs

        if not self.runtime.main:
            return []
        tcfg = self.config["train"]
        total, every = int(tcfg["steps"]), int(tcfg["log_every"])
        out = [logs.JsonLines(self.out / "metrics.jsonl", every, total)]
        if tcfg["tensorboard"]:
            out.append(logs.TensorBoard(self.out / "tensorboard", every, total))
        out.append(logs.ProgressBar(start, total, every, enabled=progress))
        if tcfg["sample_every"]:
            out.append(logs.Every(int(tcfg["sample_every"]),
                                  lambda step: self.sample_grid(self.out / "samples" / f"step_{step:08d}.png")))
        return out

    def run(self, resume: bool = False, progress: bool = True, logs: list | None = None) -> dict[str, Any]:
        """Train to ``train.steps`` with ``logs`` (default: :meth:`default_logs`) watching, then write
        ``final/`` (a pipeline of the EMA weights). Returns the last record."""
        start = self.resume() if resume else 0
        self._open_run_directory(start)
        attached = self.default_logs(start, progress) if logs is None else logs
        last: dict[str, Any] = {}
        try:
            for record in self.steps(start):
                for log in attached:
                    log(record)
                last = record
        finally:
            for log in attached:
                log.close()
        if self.runtime.main:
            self.pipeline().save_pretrained(self.out / "final")
        self.runtime.finish()
        return last

    def _pipeline(self, network: nn.Module, vae: nn.Module | None):
        from difflab.pipeline import Pipeline

        s = self.config["sample"]
        guidance = {"method": s["guidance"], "options": dict(s["guidance_options"])} if s["guidance"] != "none" else {}
        dropout = self.config["loss"]["cond_dropout"] if self.num_classes or self.text is not None else None
        text = {"name": self.config["text"]["encoder"], "max_tokens": int(self.config["text"]["max_tokens"])} \
            if self.text is not None else None
        return Pipeline(network, self.process, self.prediction, sample_shape=tuple(self.x.shape[1:]),
                        sampler=s["sampler"], steps=s["steps"], schedule=s["schedule"], num_classes=self.num_classes,
                        text_encoder=text, vae=vae, guidance=guidance, cond_dropout=dropout,
                        inpainting=self.config["loss"]["task"] == "inpaint", student=self.student)

    def pipeline_config(self, checkpoint_dir: Path) -> dict[str, Any]:
        """What a checkpoint at ``checkpoint_dir`` carries for export: the pipeline's config, the
        network's config and where the VAE folder is, relative to the checkpoint."""
        config = {**self._pipeline(self.model, self.vae).config(), "network": self.model.to_config()}
        if self.vae is not None:
            config["vae_folder"] = os.path.relpath(self.vae_folder.resolve(), Path(checkpoint_dir).resolve())
        return config

    def pipeline(self, use_ema: bool = True):
        """The current (EMA) model as a :class:`~difflab.pipeline.Pipeline` (copies of the networks)."""
        import copy

        net = copy.deepcopy(self.ema.module if use_ema else self.model).eval()
        vae = copy.deepcopy(self.vae).eval() if self.vae is not None else None
        return self._pipeline(net, vae)

    # --- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, n: int, *, labels: Tensor | None = None, seed: int = 0, use_ema: bool = True) -> Tensor:
        """``n`` samples (seeds ``seed ..``) with the recipe's sampler, through the pipeline."""
        prompts = None
        if self.text is not None:
            distinct = self.text["captions"]
            prompts = [distinct[i % len(distinct)] for i in range(n)]
        return self.pipeline(use_ema)(n, seed=seed, class_labels=labels, prompts=prompts).images

    def sample_grid(self, path: Path) -> Path:
        from difflab.plotting import image_grid, scatter

        path.parent.mkdir(parents=True, exist_ok=True)
        n = int(self.config["sample"]["n"])
        out = self.generate(n)
        if out.ndim == 2:
            scatter({"samples": out, "data": self.x[:n]}, path, lim=2.0)
        else:
            image_grid(out, nrow=self.num_classes or None, scale=max(1, 64 // out.shape[-1])).save(path)
        return path
