"""Saved pipelines: everything needed to sample a trained model, in one folder.

A pipeline folder holds ``pipeline.json`` (process, prediction, default sampler and schedule, sample
shape, conditioning, text encoder, default guidance), ``network/`` (safetensors + config) and, for
latent models, ``vae/``. ``Pipeline.from_pretrained(dir)(n=16, seed=0)`` returns the images and, per
image, every setting needed to make it again bit for bit.

Reproducibility: image ``i`` draws its noise, and a stochastic sampler its per-step noise, from a
generator seeded with its own seed, so an image does not depend on the noise of the rest of its
batch. A network's floating-point result can depend on the batch size, though (different kernels),
so each image's settings also record its batch (``batch_seeds``, ``batch_index`` and the batch's
labels or prompts), and :meth:`Pipeline.reproduce` reruns that batch to give the image bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflab import predictions, processes
from difflab.checks import describe, fits
from difflab.denoiser import Denoiser
from difflab.files import png_bytes, write_atomic
from difflab.models import Network

Tensor = torch.Tensor
FORMAT = "difflab-pipeline"
VERSION = 1
CALIBRATION = "calibration.json"
INT8_CALIBRATION = "int8.json"


@contextlib.contextmanager
def _eval_mode(*networks: torch.nn.Module | None):
    """Networks in eval mode for the ``with`` (no dropout), each back in its own mode afterwards:
    a pipeline may hold a network that is still training (a trainer's previews and checkpoints)."""
    present = [n for n in networks if n is not None]
    modes = [n.training for n in present]
    for net in present:
        net.eval()
    try:
        yield
    finally:
        for net, mode in zip(present, modes, strict=True):
            net.train(mode)


def _wraps_guidance(accelerator: dict[str, Any] | None) -> bool:
    from difflab import accel  # imported here, as in _accelerated: sampling without one needs no accel

    return accel.wraps_guidance(accelerator)


def _accelerated(denoiser: Denoiser, accelerator: dict[str, Any] | None):
    if not accelerator:
        return contextlib.nullcontext(denoiser)
    from difflab import accel

    return accel.accelerate(denoiser, accelerator)


def _accelerator_record(accelerator: dict[str, Any]) -> dict[str, Any]:
    """What an image's settings keep of its accelerator: a T-Stitch small network given as an object is
    named by its folder path or its weights' identity."""
    record = dict(accelerator)
    small = record.get("small")
    if isinstance(small, os.PathLike):
        record["small"] = str(small)
    elif small is not None and not isinstance(small, str):
        record["small"] = f"pipeline {small.identity()}" if isinstance(small, Pipeline) else type(small).__name__
    return record


def _digest(t: Tensor) -> str:
    """A short hash of a tensor's values: which image or mask an edit started from."""
    import hashlib

    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def weights_digest(*modules: torch.nn.Module | None) -> str:
    """A short hash of modules' weights (names and bytes): which model, LoRA or ControlNet it is."""
    import hashlib

    digest = hashlib.sha256()
    for module in modules:
        for key, value in (module.state_dict().items() if module is not None else ()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class PipelineError(ValueError):
    """A folder is not a pipeline, or a pipeline cannot make what was asked."""


def read_config(path: Path) -> dict[str, Any]:
    """A ``pipeline.json`` (of a pipeline folder or a training checkpoint), checked."""
    from difflab.files import read_json

    cfg = read_json(path, "pipeline config")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or cfg.get("version", 0) > VERSION:
        raise PipelineError(f"{path} is not a difflab pipeline config of version <= {VERSION}")
    for key, (hint, required) in CONFIG_FIELDS.items():
        if key not in cfg:
            if required:
                raise PipelineError(f"{path} lacks {key!r}: the pipeline config is damaged; export it again")
            continue
        value = cfg[key]
        ok = fits(value, hint)
        if key == "sample_shape":
            ok = ok and bool(value) and all(v > 0 for v in value)
        if key == "steps":
            ok = ok and value >= 1
        if not ok:
            raise PipelineError(f"{path}: {key} must be {describe(hint)}"
                                f"{' of positive values' if key in ('sample_shape', 'steps') else ''}, got {value!r}")
    return cfg


#: pipeline.json's fields: the type each may have, and whether it must be there
CONFIG_FIELDS: dict[str, tuple[Any, bool]] = {
    "process": (dict, True), "prediction": (dict | str, True), "sample_shape": (list[int], True),
    "sampler": (str, True), "steps": (int, True), "schedule": (str, True), "num_classes": (int | None, False),
    "text_encoder": (dict | None, False), "latent": (bool, False), "guidance": (dict, False),
    "cond_dropout": (float | None, False), "inpainting": (bool, False),
}


@dataclass
class Output:
    """Images in [-1, 1] (N, C, H, W) on the CPU and the settings of each."""

    images: Tensor
    settings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pil(self) -> list:
        from difflab.plotting import image_grid

        return [image_grid(img[None], nrow=1, pad=0) for img in self.images]

    def save(self, out: str | os.PathLike, grid_name: str = "grid.png") -> Path:
        """Write ``grid.png``, ``NNNNN.png`` per image (its settings inside, :func:`~difflab.files.png_bytes`)
        and ``NNNNN.json`` with the same settings."""
        from difflab.plotting import image_grid

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for i, (pil, settings) in enumerate(zip(self.pil, self.settings, strict=True)):
            write_atomic(out / f"{i:05d}.png", png_bytes(pil, settings))
            write_atomic(out / f"{i:05d}.json", json.dumps(settings, indent=1).encode())
        scale = max(1, 64 // self.images.shape[-1])
        image_grid(self.images, scale=scale).save(out / grid_name)
        return out / grid_name


class Pipeline:
    """A network with its process and prediction, sampling defaults, and conditioning.

    ``num_classes``: class-conditional (``class_labels``); ``text_encoder``: a config like
    ``{"name": "minilm", "max_tokens": 32}`` (``prompts``); ``vae``: sample latents of
    ``sample_shape`` and decode them. ``cond_dropout``: the rate the model was trained with (0 means
    it has no unconditional branch, so CFG-type guidance is refused in favour of ICG).
    ``inpainting``: the network is a trained inpainting model (``concat`` takes the mask and the
    masked image); plain sampling gives it an all-repaint mask. ``student``: a distilled model's
    record ``{"method", "sampler", "steps"}`` (the sampler and step counts it was trained for);
    sampling it otherwise warns.
    """

    def __init__(self, network: Network, process: processes.Process,
                 prediction: str | dict[str, Any] | predictions.Prediction, *,
                 sample_shape: Sequence[int], sampler: str = "dpmpp_2m", steps: int = 20, schedule: str = "karras",
                 num_classes: int | None = None, text_encoder: dict[str, Any] | None = None,
                 vae: Network | None = None, guidance: dict[str, Any] | None = None,
                 cond_dropout: float | None = None, inpainting: bool = False,
                 student: dict[str, Any] | None = None):
        self.network, self.process, self.prediction = network, process, predictions.get(prediction)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        from difflab.samplers import SamplerSpec

        try:
            SamplerSpec(sampler, int(steps), schedule)  # the defaults are checked when the pipeline is made
        except ValueError as err:
            raise PipelineError(f"the pipeline's default sampling: {err}") from err
        self.sampler, self.steps, self.schedule = sampler, int(steps), schedule
        self.num_classes, self.text_encoder_config, self.vae = num_classes, text_encoder, vae
        self.guidance, self.cond_dropout, self.inpainting = dict(guidance or {}), cond_dropout, bool(inpainting)
        self.student = dict(student) if student else None
        self._encoder, self._identity = None, None
        #: per step count, a calibrated way to sample (``tune``; ``calibration.json`` in the folder)
        self.calibration: dict[int, Any] = {}
        self._calibrated_for: str | None = None
        #: the convolutions' timestep-aware int8 ranges (``calibrate_int8``; ``int8.json`` in the folder)
        self.int8_calibration: dict[str, Any] | None = None

    # --- folder ---------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "process": self.process.to_config(),
                "prediction": self.prediction.to_config(), "sample_shape": list(self.sample_shape),
                "sampler": self.sampler, "steps": self.steps, "schedule": self.schedule,
                "num_classes": self.num_classes, "text_encoder": self.text_encoder_config,
                "latent": self.vae is not None, "guidance": self.guidance, "cond_dropout": self.cond_dropout,
                "inpainting": self.inpainting, **({"student": self.student} if self.student else {})}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the folder; ``pipeline.json`` last, so a half-written folder is never a pipeline."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.network.save_pretrained(directory / "network")
        if self.vae is not None:
            self.vae.save_pretrained(directory / "vae")
        if self.calibration:
            self.save_calibration(directory)
        if self.int8_calibration:
            write_atomic(directory / INT8_CALIBRATION, json.dumps(self.int8_calibration, indent=1).encode())
        write_atomic(directory / "pipeline.json", json.dumps(self.config(), indent=1).encode())
        return directory

    def save_calibration(self, directory: str | os.PathLike) -> Path:
        """Write ``calibration.json`` (the tuned samplers, with the weights' identity) into a folder."""
        path = Path(directory) / CALIBRATION
        payload = {"format": "difflab-calibration", "version": 1, "model": self.identity(),
                   "entries": {str(k): v.to_config() for k, v in sorted(self.calibration.items())}}
        write_atomic(path, json.dumps(payload, indent=1).encode())
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> Pipeline:
        directory = Path(directory)
        if not (directory / "pipeline.json").is_file() and (directory / "model_index.json").is_file():
            raise PipelineError(f"{directory} is a diffusers pipeline folder: open it with "
                                "difflab.interop.from_diffusers (or difflab.interop.open_pipeline, which opens "
                                "either kind); difflab sample, serve and the recipes open it directly")
        if not (directory / "pipeline.json").is_file():
            hint = (" It holds a bare network (config.json): load it with difflab.models.Network.from_pretrained."
                    if (directory / "config.json").is_file() else "")
            raise PipelineError(f"{directory} is not a difflab pipeline: it has no pipeline.json.{hint} "
                                "Pipelines are written by Pipeline.save_pretrained, by training "
                                "(OUT_DIR/final) or by `difflab export`.")
        cfg = read_config(directory / "pipeline.json")
        network = Network.from_pretrained(directory / "network").to(device)
        vae = Network.from_pretrained(directory / "vae").to(device) if cfg.get("latent") else None
        pipe = cls.from_parts(cfg, network, vae)
        if (directory / CALIBRATION).is_file():
            from difflab.files import read_json
            from difflab.samplers.calibration import Tuned

            payload = read_json(directory / CALIBRATION, "calibration")
            if payload.get("format") != "difflab-calibration":
                raise PipelineError(f"{directory / CALIBRATION} is not a difflab calibration file")
            pipe.calibration = {int(k): Tuned.from_config(v) for k, v in payload["entries"].items()}
            pipe._calibrated_for = payload["model"]
        if (directory / INT8_CALIBRATION).is_file():
            from difflab.files import read_json

            pipe.int8_calibration = read_json(directory / INT8_CALIBRATION, "int8 calibration")
        return pipe

    @classmethod
    def from_parts(cls, config: dict[str, Any], network: Network, vae: Network | None = None) -> Pipeline:
        """A pipeline from its ``pipeline.json`` config and its (loaded) networks. Training
        checkpoints carry the same config, so export needs nothing else (``training/export.py``)."""
        if bool(config.get("latent")) != (vae is not None):
            raise PipelineError("the pipeline config says latent=" f"{bool(config.get('latent'))}, but a VAE was "
                                f"{'not ' if vae is None else ''}given")
        prediction = config["prediction"]  # a name in version-1 folders written before the config protocol
        network.eval()
        if vae is not None:
            vae.eval()
        return cls(network, processes.from_config(config["process"]),
                   predictions.get(prediction) if isinstance(prediction, str) else predictions.from_config(prediction),
                   sample_shape=config["sample_shape"], sampler=config["sampler"], steps=config["steps"],
                   schedule=config["schedule"], num_classes=config.get("num_classes"),
                   text_encoder=config.get("text_encoder"), vae=vae, guidance=config.get("guidance"),
                   cond_dropout=config.get("cond_dropout"), inpainting=bool(config.get("inpainting", False)),
                   student=config.get("student"))

    def to(self, device: str | torch.device) -> Pipeline:
        self.network.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def compile(self, **options: Any) -> Pipeline:
        """Compile the network (and the VAE) with ``torch.compile`` in place (``nn.Module.compile``:
        the modules, their weights and their hooks stay as they are); ``options`` go to
        ``torch.compile`` (``backend``, ``mode``; ``dynamic=False`` unless given). The first call at
        each shape compiles (a CFG batch is a second shape); then the steps of a run, and the block
        caches, guidance caches, T-GATE and token merging, do not recompile (tests)."""
        options = {"dynamic": False, **options}
        self.network.compile(**options)
        if self.vae is not None:
            self.vae.compile(**options)
        return self

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images the pipeline makes (decoded, for a latent pipeline)."""
        factor = self.vae.downsampling if self.vae is not None else 1
        return self.sample_shape[1] * factor, self.sample_shape[2] * factor

    @property
    def image_channels(self) -> int:
        """The channels of the images the pipeline makes and edits."""
        return self.vae.config.in_channels if self.vae is not None else self.sample_shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    # --- sampling ---------------------------------------------------------------------------------
    def denoiser(self) -> Denoiser:
        return Denoiser(self.network, self.process, self.prediction)

    def text_encoder(self):
        if self.text_encoder_config is None:
            raise PipelineError("this pipeline's model is not text-conditional: it takes no prompts")
        if self._encoder is None:
            from difflab.models import conditioning

            opts = {k: v for k, v in self.text_encoder_config.items() if k != "name"}
            self._encoder = conditioning.get(self.text_encoder_config["name"], **opts)
        return self._encoder

    def _conditions(self, n: int, class_labels, prompts) -> tuple[list[dict[str, Any]], dict[str, Tensor] | None]:
        """Per image: its condition settings; and the tensors for the network (or None)."""
        if class_labels is not None and not self.num_classes:
            raise PipelineError("this pipeline's model is not class-conditional: it takes no class_labels")
        if prompts is not None and self.text_encoder_config is None:
            raise PipelineError("this pipeline's model is not text-conditional: it takes no prompts")
        if self.num_classes:
            labels = torch.arange(n) % self.num_classes if class_labels is None else torch.as_tensor(class_labels)
            labels = labels.reshape(-1).long().expand(n) if labels.numel() == 1 else labels.reshape(-1).long()
            if len(labels) != n or bool(((labels < -1) | (labels >= self.num_classes)).any()):
                raise PipelineError(f"class_labels must be {n} values in [0, {self.num_classes}) (or -1: none)")
            return [{"class_label": int(c)} for c in labels], {"class_labels": labels}
        if self.text_encoder_config is not None:
            if prompts is None:
                raise PipelineError("this pipeline's model is text-conditional: pass prompts")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            prompts = prompts * n if len(prompts) == 1 else prompts
            if len(prompts) != n:
                raise PipelineError(f"{len(prompts)} prompts for {n} images; give one prompt or one per image")
            if any(not p.strip() for p in prompts):
                warnings.warn("an empty prompt is the null condition: those images are sampled unconditionally",
                              stacklevel=3)
            return [{"prompt": p} for p in prompts], self.text_encoder()(prompts)
        return [{} for _ in range(n)], None

    def _image_settings(self, cond_settings: list[dict[str, Any]], start: int, batch_seeds: list[int], i: int,
                        steps: int, sampler: str, schedule: str, sampler_options: dict[str, Any],
                        guidance: str | None, guidance_options: dict[str, Any]) -> dict[str, Any]:
        """What every image's settings record holds: its seed and condition, the sampling, and its
        batch (seeds, index, the batch's conditions), which :meth:`reproduce` reruns."""
        batch_conds = cond_settings[start: start + len(batch_seeds)]
        return {"seed": batch_seeds[i], **cond_settings[start + i], "steps": steps, "sampler": sampler,
                "schedule": schedule, "sampler_options": sampler_options, "guidance": guidance or "none",
                "guidance_options": {k: v for k, v in guidance_options.items() if k != "weak"},
                "batch_seeds": batch_seeds, "batch_index": i,
                **{f"batch_{key}s": [c[key] for c in batch_conds] for key in batch_conds[0]},
                "device": str(self.device), "model": self.identity()}

    def _sampling(self, steps: int | None, sampler: str | None, schedule: str | None, guidance: str | None,
                  guidance_options: dict[str, Any] | None) -> tuple[int, str, str, str | None, dict[str, Any]]:
        """A call's sampling settings, the pipeline's defaults where it gives none (its default
        guidance options under the call's own when the guidance method is the default one)."""
        if guidance is None:
            guidance = self.guidance.get("method")
            guidance_options = {**self.guidance.get("options", {}), **(guidance_options or {})}
        return (self.steps if steps is None else steps, sampler or self.sampler, schedule or self.schedule, guidance,
                dict(guidance_options or {}))

    def _check_student(self, sampler: str, steps: int, loras: Sequence[tuple[Any, float]] | None = None) -> None:
        """Warn when a distilled student — the pipeline, or a LoRA it runs with (LCM-LoRA) — is sampled
        with a sampler or step count it was not trained for."""
        students = [("this pipeline", self.student)] if self.student else []
        pairs = loras if isinstance(loras, (list, tuple)) else []  # malformed: refused by _adapters
        students += [("a LoRA of this call", item[0].student) for item in pairs
                     if isinstance(item, tuple) and len(item) == 2 and getattr(item[0], "student", None) and item[1]]
        for who, student in students:
            trained_steps = student.get("steps") or []
            if sampler == student["sampler"] and (not trained_steps or steps in trained_steps):
                continue
            counts = ", ".join(str(k) for k in trained_steps) or "any"
            warnings.warn(f"{who} is a {student['method']} student trained for the "
                          f"{student['sampler']!r} sampler at {counts} step(s); sampling it with {sampler!r} at "
                          f"{steps} step(s) is outside what it learned and may look worse than its teacher",
                          stacklevel=3)

    def _scalar_conditions(self, cond: dict[str, Tensor] | None, n: int, steps: int, schedule: str,
                           guidance: str | None, options: dict[str, Any]
                           ) -> tuple[dict[str, Tensor] | None, str | None]:
        """The numbers a distilled network is told, and the guidance left to run: a shortcut model
        (Frans et al. 2024) gets the size of its even steps; a latent consistency model (Luo et al.
        2023) gets the CFG scale as an input instead of running CFG's second branch."""
        config = self.network.config
        if getattr(config, "step_size_embedding", False):
            if schedule != "trailing":
                raise PipelineError(f"a shortcut model takes even steps t_max/steps; sample it with "
                                    f"schedule='trailing' (got {schedule!r})")
            cond = {**(cond or {}), "step_size": torch.full((n,), float(self.process.t_max) / steps)}
        if getattr(config, "guidance_embedding", False) and guidance == "cfg":
            scale = float(options.get("scale", 1.0))
            cond, guidance = {**(cond or {}), "guidance_scale": torch.full((n,), scale)}, None
        return cond, guidance

    def _guided(self, den: Denoiser, method: str | None, options: dict[str, Any]):
        if not method or method == "none":
            return den
        from difflab import guidance

        needs_null = guidance.get(method).uses_null_condition(options)
        if needs_null and self.cond_dropout == 0:
            raise PipelineError(f"{method} guidance needs an unconditional branch, but this model was trained "
                                "without condition dropout (cond_dropout = 0). Use guidance='icg', which needs "
                                "no unconditional training, or retrain with loss.cond_dropout > 0.")
        opts = dict(options)
        if method == "icg" and self.num_classes:
            opts.setdefault("num_classes", self.num_classes)
        if needs_null and self.text_encoder_config is not None:
            opts["uncond"] = {k: v.to(self.device) for k, v in self.text_encoder().null(1).items()}
        return guidance.guide(den, method, **opts)

    @torch.no_grad()
    def __call__(self, n: int | None = None, *, seed: int = 0, seeds: Sequence[int] | None = None,
                 steps: int | None = None, sampler: str | None = None, schedule: str | None = None,
                 class_labels: Any = None, prompts: str | Sequence[str] | None = None,
                 guidance: str | None = None, guidance_options: dict[str, Any] | None = None,
                 batch_size: int = 64, callback: Callable | None = None, progress: bool = False,
                 accelerator: dict[str, Any] | None = None, image_prompt: dict[str, Any] | None = None,
                 loras: Sequence[tuple[Any, float]] | None = None, controls: Any = None,
                 calibrated: bool = False, **sampler_options: Any) -> Output:
        """Sample ``n`` images (seeds ``seed .. seed + n - 1``, or ``seeds``).

        ``calibrated``: sample with the sampler, grid and coefficients that :meth:`tune` found for
        this step count (``sampler`` and ``schedule`` must then be left out).

        ``guidance`` names a method of :mod:`difflab.guidance` (``cfg``, ``apg``, ``icg``, ``pag``)
        with ``guidance_options`` (``scale``, ``interval``, ``rescale``, ...); the pipeline's default
        applies when it is None, ``"none"`` turns it off. ``accelerator`` names one of
        :mod:`difflab.accel` with its options (``{"name": "deep_cache", "interval": 3}``).
        ``image_prompt``: ``{"adapter": ImagePromptAdapter, "images": (n, C, H, W), "scale": 1.0}``,
        reference images that the images should look like (IP-Adapter). ``loras``: ``[(LoRA, scale),
        ...]`` applied at run time (:func:`difflab.adapters.merge` merges them instead).
        ``controls``: one :class:`~difflab.adapters.Control` or several (their residuals add), each
        with one control image per image; guidance keeps the control on both branches.
        """
        from tqdm import tqdm

        from difflab.samplers import sample

        if seeds is None:
            if n is None:
                n = len(prompts) if isinstance(prompts, list | tuple) else (
                    len(class_labels) if isinstance(class_labels, list | tuple | Tensor) else 1)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise PipelineError(f"n must be a whole number >= 1 (images to make), got {n!r}")
            seeds = list(range(seed, seed + n))
        seeds = [int(s) for s in seeds]
        n = len(seeds)
        if n == 0:
            raise PipelineError("seeds is empty: give at least one seed")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise PipelineError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise PipelineError(f"steps must be a whole number >= 1, got {steps!r} (leave it out for the pipeline's "
                                f"default of {self.steps})")
        if calibrated:
            if sampler is not None or schedule is not None:
                raise PipelineError("calibrated sampling brings its own sampler and grid: leave sampler and "
                                    "schedule out")
            spec = self._calibrated(self.steps if steps is None else steps)
            sampler, schedule, sampler_options = spec.name, list(spec.schedule), {**spec.options, **sampler_options}
        steps, sampler, schedule, guidance, guidance_options = self._sampling(steps, sampler, schedule, guidance,
                                                                              guidance_options)
        self._check_student(sampler, steps, loras)
        cond_settings, cond = self._conditions(n, class_labels, prompts)
        cond, applied_guidance = self._scalar_conditions(cond, n, steps, schedule, guidance, guidance_options)
        den = self.denoiser()
        accel_config = self._accelerator_config(accelerator, loras, controls, image_prompt)
        adapters, control_list = self._adapters(n, loras, controls)
        if loras:
            from difflab.adapters import WithLoRA

            den = WithLoRA(den, list(loras))
        images, settings = [], []
        starts = range(0, n, batch_size)
        bar = tqdm(total=len(starts) * steps, desc=f"sampling {n} in {len(starts)} batch(es)", unit="step",
                   disable=not progress, dynamic_ncols=True)

        def step_callback(i, t, x, denoised):
            bar.update()
            if callback is not None:
                callback(i, t, x, denoised)

        small = (accel_config or {}).get("small")
        with _eval_mode(self.network, self.vae, small.network if isinstance(small, Pipeline) else None):
            for start in starts:  # sampling runs in eval mode; the caller's mode is kept
                batch_seeds = seeds[start: start + batch_size]
                gens = [torch.Generator(device=self.device).manual_seed(s) for s in batch_seeds]
                noise = torch.stack([torch.randn(self.sample_shape, generator=g, device=self.device) for g in gens])
                bcond = {k: v[start: start + batch_size].to(self.device) for k, v in (cond or {}).items()}
                model = den
                if control_list:
                    from difflab.adapters import Control, Controlled

                    model = Controlled(den, [Control(c.controlnet, c.image[start: start + batch_size].to(self.device),
                                                     c.scale, c.start, c.end) for c in control_list])
                outer = _wraps_guidance(accelerator)  # a guidance cache wraps the guided denoiser
                with contextlib.ExitStack() as stack:
                    fast = stack.enter_context(_accelerated(model, None if outer else accel_config))
                    if self.inpainting:  # a trained inpainting model generating: everything is repainted
                        from difflab.editing.inpaint import WithInputs, inpainting_inputs

                        full = torch.ones_like(noise[:, :1])
                        fast = WithInputs(fast, inpainting_inputs(torch.zeros_like(noise), full))
                    model = self._guided(fast, applied_guidance, guidance_options)
                    outer_config = self._stitch_guided(accel_config, applied_guidance, guidance_options)
                    model = stack.enter_context(_accelerated(model, outer_config if outer else None))
                    if image_prompt:
                        from difflab.adapters import ImagePrompted

                        adapter = image_prompt["adapter"]
                        refs = image_prompt["images"][start: start + batch_size].to(self.device)
                        model = ImagePrompted(model, adapter, adapter.embed(refs), image_prompt.get("scale", 1.0))
                    x, nfe = sample(model, noise, sampler, steps=steps, schedule=schedule, generator=gens, cond=bcond,
                                    callback=step_callback, return_nfe=True, **sampler_options)
                if self.vae is not None:
                    x = self.vae.from_latent(x)
                images.append(x.float().clamp(-1, 1).cpu())
                for i in range(len(batch_seeds)):
                    settings.append({
                        **self._image_settings(cond_settings, start, batch_seeds, i, steps, sampler, schedule,
                                               sampler_options, guidance, guidance_options),
                        "denoiser_calls": nfe,
                        **({"accelerator": _accelerator_record(accelerator)} if accelerator else {}),
                        **self._adapter_settings(adapters, control_list, start + i),
                        **({"image_prompt": {"scale": float(image_prompt.get("scale", 1.0)),
                                             "image_sha256": _digest(image_prompt["images"][start + i])}}
                           if image_prompt else {}),
                    })
        bar.close()
        return Output(torch.cat(images), settings)

    def _accelerator_config(self, accelerator: dict[str, Any] | None, loras: Any, controls: Any,
                            image_prompt: Any) -> dict[str, Any] | None:
        """The accelerator's options with what the pipeline holds for it: int8's calibration, T-Stitch's
        ``small`` pipeline (a folder opened on this pipeline's device); the images' settings keep what
        was given."""
        if accelerator and accelerator.get("name") == "int8":
            return self._int8_options(accelerator)
        if not accelerator or accelerator.get("name") != "t_stitch" or "small" not in accelerator:
            return accelerator
        if loras or controls or image_prompt:
            raise PipelineError("LoRAs, controls and image prompts fit one network, and T-Stitch samples with two: "
                                "use them without the t_stitch accelerator")
        small = accelerator["small"]
        if isinstance(small, str | os.PathLike):
            small = Pipeline.from_pretrained(small, device=self.device)
        if isinstance(small, Pipeline) and (
                (small.num_classes, small.text_encoder_config, small.vae is None, small.sample_shape)
                != (self.num_classes, self.text_encoder_config, self.vae is None, self.sample_shape)):
            raise PipelineError("the small pipeline of T-Stitch must take the same conditions (classes, text "
                                "encoder), latent space and sample shape as this one")
        return {**accelerator, "small": small}

    def _int8_options(self, accelerator: dict[str, Any]) -> dict[str, Any]:
        """``{"name": "int8", "convs": True}``: the convolutions too, with this pipeline's calibration."""
        options = {k: v for k, v in accelerator.items() if k != "convs"}
        if not accelerator.get("convs"):
            return options
        if self.int8_calibration is None:
            raise PipelineError("int8 convolutions need this pipeline's timestep-aware calibration: run "
                                "pipe.calibrate_int8() (then save_pretrained keeps it in int8.json), or leave "
                                "convs out for int8 linear layers only")
        if self.int8_calibration.get("model") != self.identity():
            raise PipelineError("the int8 calibration was made for other weights (the network changed since): run "
                                "pipe.calibrate_int8() again")
        return {**options, "calibration": self.int8_calibration}

    def calibrate_int8(self, n: int = 32, *, seed: int = 1_000_000, steps: int | None = None, intervals: int = 8,
                       class_labels: Any = None, prompts: str | Sequence[str] | None = None) -> dict[str, Any]:
        """Timestep-aware int8 ranges of the network's convolutions (Q-Diffusion; see
        :func:`difflab.accel.calibrate_int8`) from ``n`` images sampled the pipeline's default way
        (its sampler, grid and guidance; seeds from ``seed``, apart from the usual ones). Kept in
        :attr:`int8_calibration` and, by :meth:`save_pretrained`, in ``int8.json``; sampling uses it
        with ``accelerator={"name": "int8", "convs": True}``."""
        from difflab import accel
        from difflab.samplers import sample

        steps, sampler, schedule, method, options = self._sampling(steps, None, None, None, None)
        _, cond = self._conditions(n, class_labels, prompts)
        cond, method = self._scalar_conditions(cond, n, steps, schedule, method, options)
        gens = [torch.Generator(device=self.device).manual_seed(seed + i) for i in range(n)]
        noise = torch.stack([torch.randn(self.sample_shape, generator=g, device=self.device) for g in gens])
        cond = {k: v.to(self.device) for k, v in (cond or {}).items()}

        def run(den: Any) -> Tensor:
            return sample(self._guided(den, method, options), noise, sampler, steps=steps, schedule=schedule,
                          generator=gens, cond=cond)

        with _eval_mode(self.network, self.vae):
            ranges = accel.calibrate_int8(self.denoiser(), run, intervals)
        self.int8_calibration = {**ranges, "model": self.identity(), "steps": steps, "n": n}
        return self.int8_calibration

    def _stitch_guided(self, config: dict[str, Any] | None, method: str | None,
                       options: dict[str, Any]) -> dict[str, Any] | None:
        """T-Stitch's small network guided as the large one is (each network its own guidance, so
        methods that reach into the network, PAG and ICG, perturb the one that runs)."""
        if not config or config.get("name") != "t_stitch" or "small" not in config:
            return config
        small = config["small"]
        owner = small if isinstance(small, Pipeline) else self
        return {**config, "small": owner._guided(small.denoiser() if isinstance(small, Pipeline) else small,
                                                 method, options)}

    def _adapters(self, n: int, loras: Any, controls: Any) -> tuple[dict[str, Any], list[Any]]:
        """A call's LoRAs and controls, checked, and what the images' settings record of them."""
        from difflab.adapters import Control, LoRA

        record: dict[str, Any] = {}
        if loras:
            if isinstance(loras, LoRA) or not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], LoRA)
                                                  for x in loras):
                raise PipelineError("loras must be a list of (LoRA, scale) pairs")
            record["loras"] = [{"lora": weights_digest(lo), "scale": float(s)} for lo, s in loras]
        control_list = [controls] if isinstance(controls, Control) else list(controls or [])
        for c in control_list:
            if not isinstance(c, Control):
                raise PipelineError(f"controls must be difflab.adapters.Control objects, got {type(c).__name__}")
            if c.image.shape[0] != n:
                raise PipelineError(f"a control has {c.image.shape[0]} control images for {n} images: give one per "
                                    "image")
        if control_list:
            record["controls"] = [{"controlnet": weights_digest(c.controlnet), "scale": c.scale, "start": c.start,
                                   "end": c.end} for c in control_list]
        return record, control_list

    @staticmethod
    def _adapter_settings(adapters: dict[str, Any], control_list: list[Any], index: int) -> dict[str, Any]:
        """What image ``index``'s settings record of the call's adapters (its control images by hash)."""
        if not adapters:
            return {}
        controls = {"controls": [{**c, "image_sha256": _digest(control_list[j].image[index])}
                                 for j, c in enumerate(adapters["controls"])]} if control_list else {}
        return {"adapters": {**adapters, **controls}}

    @torch.no_grad()
    def edit(self, images: Tensor, *, mask: Tensor | None = None, strength: float | None = None,
             prompts: str | Sequence[str] | None = None, class_labels: Any = None,
             source_prompts: str | Sequence[str] | None = None, source_class_labels: Any = None,
             inversion: str | None = None, seed: int = 0, seeds: Sequence[int] | None = None,
             steps: int | None = None, sampler: str | None = None, schedule: str | None = None,
             guidance: str | None = None, guidance_options: dict[str, Any] | None = None, feather: float = 0.0,
             resample: int = 1, jump: int = 1, batch_size: int = 64, sources: Sequence[str] | None = None,
             mask_sources: Sequence[str] | None = None, callback: Callable | None = None,
             loras: Sequence[tuple[Any, float]] | None = None, controls: Any = None,
             **sampler_options: Any) -> Output:
        """Edit ``images`` (N, C, H, W) in [-1, 1] (:mod:`difflab.editing`), one mode per call:

        * ``mask`` given: inpaint where it is 1 (``strength`` 1 by default; ``feather`` pixels of soft
          edge, ``resample``/``jump`` for RePaint). Pixels where the (feathered) mask is 0 come back
          unchanged, bit for bit, for latent pipelines too (pasted back after decoding).
        * ``inversion`` given: invert the images under the source condition (``source_prompts`` /
          ``source_class_labels``, default the target's) with that deterministic sampler, exactly
          with ``"edict"`` / ``"bdia"``, or with ``"null_text"`` (CFG reconstructs), then sample under
          ``prompts`` / ``class_labels`` with guidance.
        * otherwise img2img (SDEdit) at ``strength`` (0.8 by default, as diffusers).

        ``loras`` and ``controls`` apply as in :meth:`__call__` (a control keeps one image per image).
        ``sources`` / ``mask_sources`` name the files the images and masks came from: recorded in
        the settings, they let :meth:`reproduce` (and ``difflab sample --settings``) remake an edit."""
        from difflab import editing
        from difflab.editing.inpaint import WithInputs, inpainting_inputs

        images = self._edit_images(images)
        n = len(images)
        seeds = list(range(seed, seed + n)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != n:
            raise PipelineError(f"{len(seeds)} seeds for {n} images; give one per image")
        if sources is not None and len(sources) != n:
            raise PipelineError(f"{len(sources)} source names for {n} images")
        mode = "inpaint" if mask is not None else ("invert" if inversion else "img2img")
        if mode == "inpaint" and inversion:
            raise PipelineError("pass a mask (inpainting) or an inversion, not both")
        strength = editing.check_strength({"img2img": 0.8}.get(mode, 1.0) if strength is None else strength)
        if mask is not None:
            mask = editing.feather(editing.check_mask(mask.to(self.device), images), feather)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise PipelineError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        steps, sampler, schedule, guidance, guidance_options = self._sampling(steps, sampler, schedule, guidance,
                                                                              guidance_options)
        cond_settings, cond = self._conditions(n, class_labels, prompts)
        source_settings, source = cond_settings, cond
        if source_prompts is not None or source_class_labels is not None:
            source_settings, source = self._conditions(n, source_class_labels, source_prompts)
        plain = self.denoiser()
        adapters, control_list = self._adapters(n, loras, controls)
        if loras:
            from difflab.adapters import WithLoRA

            plain = WithLoRA(plain, list(loras))
        record = {"mode": mode, "strength": strength, "inversion": inversion, "feather": feather,
                  "resample": resample, "jump": jump, "masks": list(mask_sources) if mask_sources else None}
        outputs, settings = [], []
        with _eval_mode(self.network, self.vae):
            for start in range(0, n, batch_size):
                sl = slice(start, start + batch_size)
                batch_seeds = seeds[sl]
                gens = [torch.Generator(device=self.device).manual_seed(s) for s in batch_seeds]
                pixels = images[sl]
                state = self.vae.to_latent(pixels) if self.vae is not None else pixels
                noise = torch.stack([torch.randn(state.shape[1:], generator=g, device=self.device) for g in gens])
                bcond = {k: v[sl].to(self.device) for k, v in (cond or {}).items()}
                base, m = plain, None
                if control_list:
                    from difflab.adapters import Control, Controlled

                    base = Controlled(plain, [Control(c.controlnet, c.image[sl].to(self.device), c.scale, c.start,
                                                      c.end) for c in control_list])
                if mode == "inpaint":
                    m = mask[sl]
                    if self.vae is not None:  # every latent cell touched by the mask is repainted
                        m = torch.nn.functional.adaptive_max_pool2d(m, state.shape[-2:])
                    m = (m > 0).to(state.dtype) if self.inpainting else m
                if self.inpainting:  # a trained inpainting model sees the mask and the masked image
                    region = m if m is not None else torch.ones_like(state[:, :1])
                    base = WithInputs(base, inpainting_inputs(state, region))
                model = self._guided(base, guidance, guidance_options)
                common = {"steps": steps, "schedule": schedule, "cond": bcond}
                nfe = None
                if mode == "img2img":
                    x, nfe = editing.img2img(model, state, strength, sampler=sampler, noise=noise, generator=gens,
                                             callback=callback, return_nfe=True, **common, **sampler_options)
                elif mode == "inpaint":
                    x, nfe = editing.inpaint(model, state, m, sampler=sampler, strength=strength, resample=resample,
                                             jump=jump, noise=noise, generator=gens, callback=callback,
                                             return_nfe=True, **common, **sampler_options)
                else:
                    if control_list:
                        raise PipelineError("inversion edits take no controls (the inverted path would follow the "
                                            "control too); use img2img or inpainting with a control")
                    bsource = {k: v[sl].to(self.device) for k, v in (source or {}).items()}
                    x = self._invert_and_sample(plain, model, state, inversion, steps, schedule, strength, bsource,
                                                bcond, guidance, guidance_options, sampler_options)
                x = self.vae.from_latent(x) if self.vae is not None else x
                x = x.float().clamp(-1, 1)
                if mode == "inpaint":  # the kept pixels exactly, whatever the decoder made of them
                    keep = mask[sl].expand_as(x)
                    x = torch.where(keep <= 0, pixels.float(), pixels.float() + keep * (x - pixels.float()))
                outputs.append(x.cpu())
                batch_source = source_settings[sl]
                edit_record = {**record, **{f"batch_source_{key}s": [c[key] for c in batch_source]
                                            for key in batch_source[0] if mode == "invert"},
                               "batch_sources": list(sources[sl]) if sources else None}
                for i in range(len(batch_seeds)):
                    settings.append({
                        **self._image_settings(cond_settings, start, batch_seeds, i, steps, sampler, schedule,
                                               sampler_options, guidance, guidance_options),
                        "edit": {**edit_record, "image_sha256": _digest(pixels[i]),
                                 "mask_sha256": _digest(mask[start + i]) if mask is not None else None},
                        **({"denoiser_calls": nfe} if nfe is not None else {}),
                        **self._adapter_settings(adapters, control_list, start + i),
                    })
        return Output(torch.cat(outputs), settings)

    @torch.no_grad()
    def prompt_to_prompt(self, sources: str | Sequence[str], targets: str | Sequence[str], *, seed: int = 0,
                         seeds: Sequence[int] | None = None, images: Tensor | None = None, steps: int | None = None,
                         sampler: str | None = None, schedule: str | None = None, guidance: str | None = None,
                         guidance_options: dict[str, Any] | None = None, cross_until: float = 0.2,
                         self_until: float = 1.0, reweight: dict[str, float] | None = None,
                         blend: Sequence[str] | None = None, threshold: float = 0.3) -> Output:
        """Prompt-to-prompt edits (:class:`difflab.editing.PromptToPrompt`): each source prompt and its
        target (a word swap) are sampled on the same noise, the target attending with the source's
        maps while t > ``cross_until``. ``reweight`` scales target words' attention (each word in
        every target), ``blend`` words (those a prompt has) mark the region allowed to change.
        ``images``: real images to edit, DDIM-inverted under the source prompts first. Returns the
        targets' images; their settings name the source."""
        from difflab import editing

        sources = [sources] if isinstance(sources, str) else list(sources)
        targets = [targets] if isinstance(targets, str) else list(targets)
        n = max(len(sources), len(targets)) if images is None else len(images)
        sources = sources * n if len(sources) == 1 else sources
        targets = targets * n if len(targets) == 1 else targets
        if len(sources) != n or len(targets) != n:
            raise PipelineError(f"{len(sources)} source and {len(targets)} target prompts for {n} images")
        seeds = list(range(seed, seed + n)) if seeds is None else [int(s) for s in seeds]
        steps, sampler, schedule, guidance, guidance_options = self._sampling(steps, sampler, schedule, guidance,
                                                                              guidance_options)
        encoder = self.text_encoder()
        settings_s, cond_s = self._conditions(n, None, sources)
        _, cond_t = self._conditions(n, None, targets)
        cond = {k: torch.cat([cond_s[k], cond_t[k]]).to(self.device) for k in cond_s}
        per_pair = {"reweight": {}, "blend": []}
        for pair, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
            weights = {i: f for word, f in (reweight or {}).items() for i in encoder.positions(tgt, word)}
            region = sorted({i for word in (blend or []) for p in (src, tgt) if f" {word} " in f" {p} "
                             for i in encoder.positions(p, word)})
            if pair and (weights != per_pair["reweight"] or region != per_pair["blend"]):
                raise PipelineError("the reweighted and blended words must sit at the same token positions in "
                                    "every pair; edit pairs of one template together")
            per_pair = {"reweight": weights, "blend": region}
        alignment = None
        token_lists = [(encoder.tokens(a)[: encoder.max_tokens], encoder.tokens(b)[: encoder.max_tokens])
                       for a, b in zip(sources, targets, strict=True)]
        if any(len(a) != len(b) for a, b in token_lists):  # words added or removed: the paper's refinement
            alignment = torch.stack([editing.align_tokens(a, b, encoder.max_tokens) for a, b in token_lists])
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        with _eval_mode(self.network, self.vae):
            plain = self.denoiser()
            if images is None:
                noise = torch.stack([torch.randn(self.sample_shape, generator=g, device=self.device) for g in gens])
                ts = None
            else:
                state = self._edit_images(images)
                state = self.vae.to_latent(state) if self.vae is not None else state
                inv = editing.invert(plain, state, "ddim", steps, schedule,
                                     cond={k: v.to(self.device) for k, v in cond_s.items()})
                noise, ts, sampler = inv.noise, inv.ts, "ddim"
            model = editing.PromptToPrompt(self._guided(plain, guidance, guidance_options), n,
                                           cross_until=cross_until, self_until=self_until,
                                           reweight=per_pair["reweight"], blend=per_pair["blend"], threshold=threshold,
                                           alignment=alignment)
            from difflab.samplers import sample

            pair_noise = torch.cat([noise, noise])
            x = sample(model, pair_noise, sampler, steps, schedule if ts is None else ts, cond=cond,
                       generator=gens + gens)
            x = self.vae.from_latent(x) if self.vae is not None else x
        record = {"mode": "prompt_to_prompt", "cross_until": cross_until, "self_until": self_until,
                  "reweight": dict(reweight or {}), "blend": list(blend or []), "threshold": threshold,
                  "real_images": images is not None}
        settings = [{"seed": s, "prompt": targets[i], "steps": steps, "sampler": sampler, "schedule": schedule,
                     "sampler_options": {}, "guidance": guidance or "none", "guidance_options": guidance_options,
                     "batch_seeds": seeds, "batch_index": i, "batch_prompts": targets, "model": self.identity(),
                     "edit": {**record, "source_prompt": settings_s[i]["prompt"], "batch_source_prompts": sources}}
                    for i, s in enumerate(seeds)]
        return Output(x[n:].float().clamp(-1, 1).cpu(), settings)

    def _edit_images(self, images: Tensor) -> Tensor:
        from difflab import editing

        if self.vae is None:
            return editing.check_image(images, self.sample_shape).to(self.device)
        channels = self.vae.config.in_channels
        images = editing.check_image(images).to(self.device)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != channels:
            raise PipelineError(f"this pipeline's VAE takes images of {channels} channels (N, {channels}, H, W); "
                                f"got shape {tuple(images.shape)}")
        want = self.image_size
        if tuple(images.shape[-2:]) != want:
            raise PipelineError(f"this pipeline makes {want[0]}x{want[1]} images; got {tuple(images.shape[-2:])}: "
                                "resize them first")
        return images

    def _invert_and_sample(self, plain: Denoiser, model: Any, state: Tensor, inversion: str, steps: int,
                           schedule: str, strength: float, source: dict[str, Tensor], cond: dict[str, Tensor],
                           guidance: str | None, guidance_options: dict[str, Any],
                           sampler_options: dict[str, Any]) -> Tensor:
        """Invert under the source condition, then sample under the target one. EDICT and BDIA invert
        the guided model itself (exact for any denoiser); ``null_text`` inverts at guidance 1 and
        optimises the null condition so that CFG at the pipeline's scale reconstructs; a sampler name
        inverts at guidance 1 and samples guided."""
        from difflab import editing

        if inversion in ("edict", "bdia"):
            method = editing.EDICT() if inversion == "edict" else editing.BDIA()
            inv = method.invert(model, state, steps, schedule, cond=source, strength=strength)
            return method.sample(model, inv, cond=cond)
        if inversion == "null_text":
            if guidance != "cfg":
                raise PipelineError("null-text inversion makes classifier-free guidance reconstruct: "
                                    "use guidance='cfg'")
            uncond = None
            if self.text_encoder_config is not None:
                uncond = {k: v.to(self.device) for k, v in self.text_encoder().null(1).items()}
            result = editing.null_text_inversion(plain, state, source, scale=guidance_options.get("scale", 4.0),
                                                 uncond=uncond, steps=steps, schedule=schedule)
            return result.sample(plain, cond=cond)
        inv = editing.invert(plain, state, inversion, steps, schedule, cond=source, strength=strength,
                             **sampler_options)
        return inv.sample(model, cond=cond)

    def tune(self, nfes: Sequence[int], *, sampler: str = "unipc", sampler_options: dict[str, Any] | None = None,
             n: int = 64, seed: int = 0, class_labels: Any = None, prompts: str | Sequence[str] | None = None,
             guidance: str | None = None, guidance_options: dict[str, Any] | None = None,
             reference_steps: int = 100, max_evals: int = 400, coefficient_evals: int = 200,
             bespoke: bool = False, progress: bool = False) -> dict[int, dict[str, float]]:
        """Calibrate ``sampler`` for this model at each step count in ``nfes``
        (:func:`difflab.samplers.calibration.tune`) on ``n`` images from seeds ``seed ..``, against
        ``dpmpp_3m`` at ``reference_steps``; keep the results in :attr:`calibration` (sample with
        ``calibrated=True``; ``save_calibration`` writes them to the folder). Returns per step
        count the mean squared error to the reference on ``n`` held-out images (seeds after the
        calibration's) of the sampler on its best named schedule and of the tuned one. ``bespoke``
        fits every solver coefficient through the model as well (BNS)."""
        from tqdm import tqdm

        from difflab.samplers import calibration, sample

        _, cond = self._conditions(n, class_labels, prompts)
        default_steps, _, schedule, method, options = self._sampling(None, sampler, None, guidance, guidance_options)
        cond, method = self._scalar_conditions(cond, n, default_steps, schedule, method, options)
        cond = {k: v.to(self.device) for k, v in (cond or {}).items()}
        guided = self._guided(self.denoiser(), method, options)

        def batch(first: int) -> tuple[Tensor, Tensor]:
            gens = [torch.Generator(device=self.device).manual_seed(s) for s in range(first, first + n)]
            noise = torch.stack([torch.randn(self.sample_shape, generator=g, device=self.device) for g in gens])
            return noise, sample(guided, noise, "dpmpp_3m", steps=reference_steps, schedule="karras", cond=cond)

        report = {}
        with _eval_mode(self.network, self.vae), torch.no_grad():
            noise, reference = batch(seed)
            held_noise, held_reference = batch(seed + n)
            bar = tqdm(list(nfes), desc="tuning", unit="step count", disable=not progress, dynamic_ncols=True)
            for steps in bar:
                tuned = calibration.tune(guided, int(steps), noise, sampler=sampler, sampler_options=sampler_options,
                                         reference=reference, max_evals=max_evals,
                                         coefficient_evals=coefficient_evals, bespoke=bespoke, cond=cond)

                def held(spec_like) -> float:
                    out = spec_like(guided, held_noise, cond=cond)
                    return float(((out - held_reference) ** 2).mean())

                start = min(held(lambda d, x, name=name, count=int(steps), **kw: sample(
                    d, x, sampler, steps=count, schedule=name, **(sampler_options or {}), **kw))
                    for name in calibration.NAMED_STARTS)
                self.calibration[int(steps)] = tuned
                report[int(steps)] = {"held_out_start_mse": start, "held_out_tuned_mse": held(tuned.spec),
                                      "calibration_start_mse": tuned.start_mse,
                                      "calibration_tuned_mse": tuned.tuned_mse, "seconds": tuned.seconds}
        self._calibrated_for = self.identity()
        return report

    def _calibrated(self, steps: int) -> Any:
        if not self.calibration:
            raise PipelineError("this pipeline has no calibration: run `difflab tune PIPELINE --nfe ...` "
                                "(Pipeline.tune) first")
        if self._calibrated_for != self.identity():
            raise PipelineError("the calibration was made for other weights than this pipeline's; tune it again")
        if steps not in self.calibration:
            raise PipelineError(f"no calibration for {steps} steps; calibrated step counts: "
                                f"{sorted(self.calibration)} (or tune this one)")
        return self.calibration[steps].spec

    def identity(self) -> str:
        """A short hash of the weights (network and VAE): which model made an image."""
        if self._identity is None:
            self._identity = weights_digest(self.network, self.vae)
        return self._identity

    SETTINGS_KEYS = ("seed", "steps", "sampler", "schedule", "sampler_options", "guidance", "guidance_options",
                     "batch_seeds", "batch_index")

    def reproduce(self, settings: dict[str, Any]) -> Tensor:
        """The image a settings record describes, made again (its whole batch is rerun). Settings
        made by another model are refused."""
        if not isinstance(settings, dict):
            raise PipelineError("a settings record is a JSON object written beside each image (NNNNN.json)")
        if "cancelled_after_step" in settings:
            raise PipelineError(f"this image is the preview of a run cancelled after step "
                                f"{settings['cancelled_after_step']} of {settings.get('steps')}: it cannot be remade; "
                                "its settings (in `difflab serve`, drop the PNG on the page) make the finished image")
        missing = [k for k in self.SETTINGS_KEYS if k not in settings]
        if missing:
            raise PipelineError(f"the settings record lacks {', '.join(missing)}: it is not an image's settings "
                                "as `difflab sample` writes them (NNNNN.json)")
        made_by = settings.get("model")
        if made_by is not None and made_by != self.identity():
            raise PipelineError(f"these settings were made by another model (weights {made_by}); this pipeline's are "
                                f"{self.identity()}. Pass the pipeline that made the image.")
        batch = settings["batch_seeds"]
        if not isinstance(batch, list) or not batch or not isinstance(settings["batch_index"], int) \
                or not 0 <= settings["batch_index"] < len(batch):
            raise PipelineError("the settings record's batch_seeds / batch_index do not describe an image of a batch")
        if "adapters" in settings:
            raise PipelineError("this image was made with LoRAs or controls: call the pipeline again with the same "
                                "adapters (their weights' hashes are in the record) and these settings")
        if "image_prompt" in settings:
            raise PipelineError("this image was made with an image prompt (IP-Adapter): call the pipeline again with "
                                "the same adapter and reference image and these settings")
        if settings.get("edit", {}).get("mode") == "prompt_to_prompt":
            edit = settings["edit"]
            if edit["real_images"]:
                raise PipelineError("this prompt-to-prompt edit started from tensors, not files: call "
                                    "Pipeline.prompt_to_prompt with the same images and these settings")
            out = self.prompt_to_prompt(edit["batch_source_prompts"], settings["batch_prompts"],
                                        seeds=settings["batch_seeds"], steps=settings["steps"],
                                        sampler=settings["sampler"], schedule=settings["schedule"],
                                        guidance=settings["guidance"], guidance_options=settings["guidance_options"],
                                        cross_until=edit["cross_until"], self_until=edit["self_until"],
                                        reweight=edit["reweight"], blend=edit["blend"], threshold=edit["threshold"])
            return out.images[settings["batch_index"]]
        if "edit" in settings:
            return self._reproduce_edit(settings)
        cond: dict[str, Any] = {}
        if "batch_class_labels" in settings:
            cond["class_labels"] = settings["batch_class_labels"]
        if "batch_prompts" in settings:
            cond["prompts"] = settings["batch_prompts"]
        out = self(seeds=batch, steps=settings["steps"], sampler=settings["sampler"], schedule=settings["schedule"],
                   guidance=settings["guidance"], guidance_options=settings["guidance_options"],
                   batch_size=len(batch), accelerator=settings.get("accelerator"), **cond,
                   **settings["sampler_options"])
        return out.images[settings["batch_index"]]

    def _reproduce_edit(self, settings: dict[str, Any]) -> Tensor:
        """An edited image made again from the files its record names (checked by their hashes)."""
        from difflab.data.folder import read_images, read_masks

        edit = settings["edit"]
        if not edit.get("batch_sources"):
            raise PipelineError("this edit's record names no image files (it was made from tensors): pass the "
                                "images to Pipeline.edit again with the recorded settings")
        channels = self.image_channels

        try:
            images = read_images(edit["batch_sources"], channels)
            mask = read_masks(edit["masks"]) if edit["mode"] == "inpaint" and edit.get("masks") else None
        except FileNotFoundError as err:
            raise PipelineError(f"the edit cannot be remade from its files: {err}") from None
        index = settings["batch_index"]
        if _digest(images[index]) != edit["image_sha256"]:
            raise PipelineError(f"{edit['batch_sources'][index]} has changed since the edit was made (its hash "
                                "differs); the edit cannot be remade from it")
        if edit["mode"] == "inpaint" and mask is None:
            raise PipelineError("this inpainting record names no mask file: it cannot be remade")
        cond: dict[str, Any] = {}
        for key, name in (("class_labels", "class_label"), ("prompts", "prompt")):
            if f"batch_{name}s" in settings:
                cond[key] = settings[f"batch_{name}s"]
            if f"batch_source_{name}s" in edit:
                cond[f"source_{key}"] = edit[f"batch_source_{name}s"]
        out = self.edit(images, mask=mask, strength=edit["strength"], inversion=edit["inversion"],
                        seeds=settings["batch_seeds"], steps=settings["steps"], sampler=settings["sampler"],
                        schedule=settings["schedule"], guidance=settings["guidance"],
                        guidance_options=settings["guidance_options"], feather=edit["feather"],
                        resample=edit["resample"], jump=edit["jump"], batch_size=len(images),
                        sources=edit["batch_sources"], mask_sources=edit.get("masks"), **cond,
                        **settings["sampler_options"])
        return out.images[index]
