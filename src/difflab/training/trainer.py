"""The trainer: one loop for every network, process and prediction, resumable bit for bit.

Exactness by construction: the data order of epoch e is a permutation seeded by (seed, e), and the
noise, times and condition dropout of step s are drawn for the whole global batch from a generator
seeded by (seed, s) and then split between ranks. So a resumed run, or a run on N processes, sees
exactly the batches and noise of one uninterrupted single-process run.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab import data as datasets
from difflab import predictions, processes
from difflab.models import from_config as network_from_config
from difflab.training import checkpoint
from difflab.training.config import ConfigError, differences
from difflab.training.ema import ema_model
from difflab.training.losses import diffusion_loss, drop_condition, immiscible_noise
from difflab.training.optim import adamw

Tensor = torch.Tensor


class TrainingError(RuntimeError):
    pass


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


def _tensorboard(directory: Path):
    """A TensorBoard writer when the ``tensorboard`` package is installed (else None: JSON lines only)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory))


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


class Trainer:
    """``Trainer(config).run(resume=...)``; see :mod:`difflab.recipes` for the recipes."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
        threads = int(config["train"]["num_threads"])
        if threads > 0:
            torch.set_num_threads(threads)
        self.out = Path(config["out_dir"])
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
            pcfg = config["process"]
            self.process = processes.from_config(pcfg)
        except (TypeError, KeyError, ValueError) as err:
            raise ConfigError(f"[process] section: {err}") from err
        self.prediction = predictions.get(config["prediction"])
        torch.manual_seed(config["seed"])
        text_dim = self.text["context"].shape[-1] if self.text is not None else None
        self.model = build_model(config, self.x[0], self.num_classes, text_dim).to(self.device)
        self.ema = ema_model(self.model, float(config["ema"]["decay"]), bool(config["ema"]["warmup"]))
        o = config["optim"]
        self.optimizer = adamw(self.model.parameters(), o["lr"], betas=(o["beta1"], o["beta2"]),
                               weight_decay=o["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           _lr_lambda(o, int(config["train"]["steps"])))
        self.batch = int(data_cfg["batch_size"])
        if self.batch % self.world:
            raise ConfigError(f"data.batch_size {self.batch} is not divisible by the {self.world} processes")
        self.ddp = None
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.ddp = nn.parallel.DistributedDataParallel(self.model)
        mp = config["train"]["mixed_precision"]
        if mp not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision must be 'no', 'bf16' or 'fp16', got {mp!r}")
        if mp != "no" and self.device.type != "cuda":
            warnings.warn("mixed precision is for CUDA; training in float32 on the CPU", stacklevel=2)
            mp = "no"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
        self.scaler = torch.amp.GradScaler("cuda") if mp == "fp16" else None

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

    # --- data and noise of one step ---------------------------------------------------------------
    def _indices(self, step: int) -> Tensor:
        n, b = len(self.x), self.batch
        per_epoch = max(1, n // b)
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config["seed"] * 100003 + epoch))
        return perm[k * b: (k + 1) * b]

    def _batch(self, step: int, micro: int) -> dict[str, Tensor]:
        """The global batch of (step, micro-step), its noise, t and labels; then this rank's slice."""
        cfg = self.config
        g = torch.Generator().manual_seed((cfg["seed"] * 1_000_003 + step) * 64 + micro)
        idx = self._indices(step * cfg["optim"]["accumulate"] + micro)
        x0 = self.x[idx]
        noise = torch.randn(x0.shape, generator=g)
        if cfg["loss"]["immiscible"]:
            noise = immiscible_noise(x0, noise)
        t = self.process.sample_t(len(idx), distribution=cfg["loss"]["t_distribution"] or None, generator=g)
        out = {"x0": x0, "noise": noise, "t": t}
        if self.labels is not None and self.num_classes:
            out["labels"] = drop_condition(self.labels[idx], cfg["loss"]["cond_dropout"], g)
        if self.text is not None:  # index -1 is the null (empty) caption
            out["caption"] = drop_condition(self.text["index"][idx], cfg["loss"]["cond_dropout"], g)
        share = len(idx) // self.world
        return {k: v[self.rank * share: (self.rank + 1) * share].to(self.device) for k, v in out.items()}

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        net = self.ddp or self.model
        cond = {"class_labels": batch["labels"]} if "labels" in batch else {}
        if "caption" in batch:
            cond = {key: self.text[key][batch["caption"]] for key in ("context", "context_mask")}
            if getattr(self.model.config, "pooled_dim", None):
                cond["pooled"] = self.text["pooled"][batch["caption"]]
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = diffusion_loss(net, batch["x0"], self.process, self.prediction, t=batch["t"],
                                  noise=batch["noise"], weighting=self.config["loss"]["weighting"],
                                  gamma=self.config["loss"]["min_snr_gamma"], **cond)
        return loss.mean()

    # --- the loop -----------------------------------------------------------------------------------
    def run(self, resume: bool = False, progress: bool = True) -> dict[str, Any]:
        from tqdm import tqdm

        cfg, tcfg = self.config, self.config["train"]
        total, accumulate = int(tcfg["steps"]), int(cfg["optim"]["accumulate"])
        start = 0
        if resume:
            found = checkpoint.latest(self.out)
            if found is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.out / 'checkpoints'}")
            saved = json.loads((found / "trainer.json").read_text())
            diff = differences(saved["config"], cfg)
            if diff:
                raise ConfigError(f"checkpoint {found} was made with another config; differing fields:\n  "
                                  + "\n  ".join(diff))
            start = checkpoint.load(found, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                    scheduler=self.scheduler)["step"]
        main = self.rank == 0
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg, indent=1))
        log = open(self.out / "metrics.jsonl", "a") if main else None
        board = _tensorboard(self.out / "tensorboard") if main and tcfg["tensorboard"] else None
        last: dict[str, Any] = {}
        bar = tqdm(range(start, total), initial=start, total=total, disable=not (progress and main),
                   desc="train", dynamic_ncols=True)
        t0 = time.time()
        self.model.train()
        for step in bar:
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
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                total_loss += float(loss.detach())
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            clip = float(cfg["optim"]["grad_clip"])
            grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf))
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.ema.update_parameters(self.model)
            done = step + 1
            last = {"step": done, "loss": total_loss, "grad_norm": grad_norm,
                    "lr": self.scheduler.get_last_lr()[0], "seconds": round(time.time() - t0, 2)}
            if main and (done % tcfg["log_every"] == 0 or done == total):
                log.write(json.dumps(last) + "\n")
                if board is not None:
                    for key in ("loss", "grad_norm", "lr"):
                        board.add_scalar(f"train/{key}", last[key], done)
                log.flush()
                bar.set_postfix(loss=f"{total_loss:.4f}")
            if main and (done % tcfg["checkpoint_every"] == 0 or done == total):
                files = {"pipeline.json": json.dumps(self.pipeline_config(checkpoint.path_of(self.out, done)),
                                                     indent=1).encode()}
                checkpoint.save(self.out, done, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                scheduler=self.scheduler, config=cfg, keep_last=tcfg["keep_last"], files=files)
            if main and tcfg["sample_every"] and done % tcfg["sample_every"] == 0:
                self.sample_grid(self.out / "samples" / f"step_{done:08d}.png")
        if log:
            log.close()
        if board is not None:
            board.close()
        if main:
            self.pipeline().save_pretrained(self.out / "final")
        return last

    # --- export ---------------------------------------------------------------------------------------
    def _pipeline(self, network: nn.Module, vae: nn.Module | None):
        from difflab.pipeline import Pipeline

        s = self.config["sample"]
        guidance = {"method": s["guidance"], "options": dict(s["guidance_options"])} if s["guidance"] != "none" else {}
        dropout = self.config["loss"]["cond_dropout"] if self.num_classes or self.text is not None else None
        text = {"name": self.config["text"]["encoder"], "max_tokens": int(self.config["text"]["max_tokens"])} \
            if self.text is not None else None
        return Pipeline(network, self.process, self.prediction, sample_shape=tuple(self.x.shape[1:]),
                        sampler=s["sampler"], steps=s["steps"], schedule=s["schedule"], num_classes=self.num_classes,
                        text_encoder=text, vae=vae, guidance=guidance, cond_dropout=dropout)

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

        net = copy.deepcopy(self.ema.module if use_ema else self.model)
        return self._pipeline(net, copy.deepcopy(self.vae))

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
