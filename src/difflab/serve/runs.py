"""Runs of a served pipeline, without any web framework: a request checked into sampling
arguments, sampling with a preview of the denoised estimate at every step and a cancel that stops
within one step, and the record of each run — finished or cancelled — with PNGs that carry their
settings (:func:`difflab.files.png_bytes`), so a PNG dropped back restores the request that made it.

The web page (:mod:`difflab.serve.app`) and its JSON API are thin layers over :func:`generate`.
"""

from __future__ import annotations

import inspect
import itertools
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from difflab import accel, guidance, samplers, schedules
from difflab.files import FileError, png_bytes, write_atomic
from difflab.pipeline import Output, Pipeline, PipelineError

Tensor = torch.Tensor

#: what one request may ask for at most (a server shared by several people stays responsive)
MAX_IMAGES = 16
MAX_STEPS = 500
#: the choice that means "no guidance" / "no accelerator" in a request
NONE = "none"


class RequestError(ValueError):
    """A request that cannot run; the message says what was wrong and what to ask for instead."""


class ServeError(RuntimeError):
    """``difflab serve`` cannot start (not a pipeline, a pipeline that fails to load, a port in use)."""


class Cancelled(Exception):
    """Raised inside the sampler's step callback once the run was cancelled."""


class RunControl:
    """A running generation's step counter and cancel switch, shared between the thread that
    samples and the one that cancels; :attr:`step_at_cancel` records how far the run had got
    when the cancel arrived, so what it did after is measured."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.step = 0
        self.step_at_cancel: int | None = None

    def cancel(self) -> None:
        if not self._event.is_set():
            self.step_at_cancel = self.step
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class Served:
    """One pipeline on the page: its name and the loaded pipeline."""

    name: str
    pipeline: Pipeline

    @property
    def conditioning(self) -> str:
        """``"text"``, ``"class"`` or ``"none"``: which condition the page asks for."""
        if self.pipeline.text_encoder_config is not None:
            return "text"
        return "class" if self.pipeline.num_classes else "none"

    @property
    def default_guidance(self) -> tuple[str, float]:
        """The pipeline's guidance method and scale: its saved scale, else the method's own default."""
        method = self.pipeline.guidance.get("method") or NONE
        if method == NONE:
            return method, 1.0
        own = inspect.signature(guidance.get(method)).parameters["scale"].default
        return method, float(self.pipeline.guidance.get("options", {}).get("scale", own))


def load_served(paths: Sequence[str | Path]) -> dict[str, Served]:
    """Every pipeline folder loaded (text encoders too), named by its folder; a :class:`ServeError`
    names the first that is not a pipeline or fails to load, before anything is served."""
    served: dict[str, Served] = {}
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise ServeError(f"{path} is not a folder: give pipeline folders (written by Pipeline.save_pretrained, "
                             "by training as OUT_DIR/final, or by `difflab export`)")
        try:
            pipe = Pipeline.from_pretrained(path)
            if pipe.text_encoder_config is not None:
                pipe.text_encoder()  # loaded now, so a missing encoder fails here and not on the first request
        except (PipelineError, FileError, ValueError, OSError, RuntimeError, ImportError) as err:
            raise ServeError(f"{path} failed to load as a pipeline: {err}") from None
        name = path.resolve().name if path.resolve().name != "final" else path.resolve().parent.name
        while name in served:
            name += "'"
        served[name] = Served(name, pipe)
    if not served:
        raise ServeError("give at least one pipeline folder to serve")
    return served


@dataclass
class Request:
    """What the page, the compare view or the API asks one pipeline for."""

    pipeline: str
    prompt: str = ""
    class_label: int | None = None
    seed: int = 0
    n: int = 1
    sampler: str | None = None  # None: the pipeline's default
    schedule: str | None = None
    steps: int | None = None
    guidance: str | None = None  # None: the pipeline's default; "none": off
    scale: float | None = None
    accelerator: str = NONE
    guidance_options: dict[str, Any] = field(default_factory=dict)  # beyond the scale
    sampler_options: dict[str, Any] = field(default_factory=dict)
    accelerator_options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _whole(value: Any, what: str, low: int, high: int | None = None, hint: str = "") -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f">= {low}"
        raise RequestError(f"{what} must be a whole number {span}, got {value!r}{hint}")
    return value


def parse_request(raw: dict[str, Any], served: dict[str, Served]) -> Request:
    """A request from JSON-like values (the page's controls or an API call), every field checked:
    a :class:`RequestError` says which one is wrong and what it may be."""
    if not isinstance(raw, dict):
        raise RequestError("a request is a JSON object, e.g. {\"pipeline\": NAME, \"prompt\": \"a red circle\"}")
    known = {f.name for f in fields(Request)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RequestError(f"unknown request field(s) {', '.join(unknown)}; the fields are {', '.join(sorted(known))}")
    name = raw.get("pipeline") if raw.get("pipeline") is not None else (next(iter(served)) if len(served) == 1
                                                                       else None)
    if name not in served:
        raise RequestError(f"unknown pipeline {name!r}; this server has {', '.join(served)}")
    pipe = served[name].pipeline
    req = Request(pipeline=name)
    req.seed = _whole(raw.get("seed", 0), "seed", 0, 2**63 - 1)
    req.n = _whole(raw.get("n", 1), "n (the number of images)", 1, MAX_IMAGES,
                   f"; this server makes at most {MAX_IMAGES} per request")
    if raw.get("steps") is not None:
        req.steps = _whole(raw["steps"], "steps", 1, MAX_STEPS)
    for key, names, what in (("sampler", samplers.available(), "sampler"),
                             ("schedule", schedules.available(), "schedule"),
                             ("guidance", [NONE, *guidance.available()], "guidance method"),
                             ("accelerator", [NONE, *accel.REGISTRY.available()], "accelerator")):
        value = raw.get(key)
        if value in (None, ""):
            continue
        if value not in names:
            raise RequestError(f"unknown {what} {value!r}; choose one of {', '.join(names)}")
        setattr(req, key, value)
    if raw.get("scale") is not None:
        try:
            req.scale = float(raw["scale"])
        except (TypeError, ValueError):
            raise RequestError(f"scale must be a number, got {raw['scale']!r}") from None
        if not 0 <= req.scale <= 100:
            raise RequestError(f"scale must be from 0 to 100, got {req.scale}")
    for key in ("guidance_options", "sampler_options", "accelerator_options"):
        value = raw.get(key) or {}
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as err:
                raise RequestError(f"{key} is not valid JSON ({err})") from None
        if not isinstance(value, dict):
            raise RequestError(f"{key} must be a JSON object of option names and values, got {value!r}")
        setattr(req, key, value)
    conditioning = served[name].conditioning
    if conditioning == "text":
        prompt = raw.get("prompt") or ""
        if not isinstance(prompt, str):
            raise RequestError(f"prompt must be text, got {prompt!r}")
        req.prompt = prompt
    elif raw.get("prompt"):
        raise RequestError(f"{name} is not a text-to-image pipeline: it takes no prompt"
                           + (f" but a class label from 0 to {pipe.num_classes - 1}" if pipe.num_classes else ""))
    if conditioning == "class":
        label = raw.get("class_label")
        req.class_label = None if label in (None, "") else _whole(label, "class_label", -1, pipe.num_classes - 1,
                                                                 " (-1 means no class)")
    elif raw.get("class_label") not in (None, ""):
        raise RequestError(f"{name} is not class-conditional: it takes no class label")
    return req


def request_from_settings(settings: dict[str, Any], served: dict[str, Served]) -> Request:
    """The request that made an image, from its settings record (a PNG's or a JSON's); the pipeline
    is the served one whose weights made it."""
    if not isinstance(settings, dict) or "batch_seeds" not in settings:
        raise RequestError("these are not an image's settings as difflab writes them (no batch_seeds)")
    made_by = settings.get("model")
    names = [s.name for s in served.values() if s.pipeline.identity() == made_by]
    if not names:
        raise RequestError(f"this image was made by a model (weights {made_by}) that this server does not serve")
    if "cancelled_after_step" in settings:  # a cancelled run's preview carries the request itself
        request = {f.name: settings[f.name] for f in fields(Request) if f.name in settings}
        return parse_request({**request, "pipeline": names[0]}, served)
    if "edit" in settings or "adapters" in settings or "image_prompt" in settings:
        raise RequestError("this image is an edit or used adapters: restore it with `difflab sample --settings` "
                           "or the Python API, which take its source images and adapters")
    options = dict(settings.get("guidance_options", {}))
    scale = options.pop("scale", None)
    accelerator = dict(settings.get("accelerator") or {"name": NONE})
    batch = settings["batch_seeds"]
    labels = settings.get("batch_class_labels") or [None]
    return Request(pipeline=names[0], prompt=(settings.get("batch_prompts") or [""])[0],
                   class_label=labels[0] if len(set(labels)) == 1 else None, seed=int(batch[0]), n=len(batch),
                   sampler=settings["sampler"], schedule=settings["schedule"], steps=int(settings["steps"]),
                   guidance=settings["guidance"], scale=scale, accelerator=accelerator.pop("name"),
                   guidance_options=options, sampler_options=dict(settings.get("sampler_options", {})),
                   accelerator_options=accelerator)


@dataclass
class Run:
    """One generation: its request, what it made (the final images, or the last preview if it was
    cancelled), every image's settings record and PNG, and what it cost."""

    id: int
    request: Request
    status: str  # "finished" | "cancelled"
    images: Tensor
    settings: list[dict[str, Any]]
    files: list[Path]
    seconds: float
    steps_done: int
    steps: int
    nfe: int  # network evaluations of the whole run (-1 when it was cancelled)
    first_preview_seconds: float | None
    sampler: str
    step_at_cancel: int | None = None  # how far the run was when the cancel arrived

    def summary(self) -> str:
        r = self.request
        what = f"'{r.prompt}'" if r.prompt else (f"class {r.class_label}" if r.class_label is not None else "")
        nfe = f"{self.nfe} NFE · " if self.nfe >= 0 else ""
        return (f"#{self.id} {self.status} · {r.pipeline} {what} · seed {r.seed} · {self.sampler} "
                f"{self.steps_done}/{self.steps} steps · {nfe}{self.seconds:.2f} s")


_run_ids = itertools.count(1)


def _call_arguments(served: Served, req: Request) -> dict[str, Any]:
    """The pipeline call a request makes: the pipeline's default guidance options stay under the
    request's scale when it keeps the default method."""
    default_method, _ = served.default_guidance
    method = req.guidance
    options = dict(req.guidance_options)
    if req.scale is not None and (method or default_method) != NONE:  # no scale is recorded for no guidance
        options["scale"] = req.scale
    accelerator = None if req.accelerator == NONE else {"name": req.accelerator, **req.accelerator_options}
    cond: dict[str, Any] = {}
    if served.conditioning == "text":
        cond["prompts"] = req.prompt
    elif served.conditioning == "class" and req.class_label is not None:  # none given: the pipeline takes
        cond["class_labels"] = req.class_label                                 # the classes in turn
    return {"seed": req.seed, "n": req.n, "steps": req.steps, "sampler": req.sampler, "schedule": req.schedule,
            "guidance": None if method in (None, default_method) and method != NONE else method,
            "guidance_options": options, "accelerator": accelerator, "batch_size": req.n, **cond,
            **req.sampler_options}


def generate(served: Served, req: Request, out_dir: str | Path, *, control: RunControl | None = None,
             on_preview: Callable[[int, int, Tensor], None] | None = None) -> Run:
    """Run ``req`` on ``served``'s pipeline, writing each image as a PNG with its settings inside.

    ``on_preview(step, steps, images)`` gets the denoised estimate (decoded, in [-1, 1]) after every
    step; ``control.cancel()`` stops the run at the next step and keeps the last preview as a run
    whose status is ``"cancelled"``. Bad requests raise :class:`RequestError`.
    """
    pipe = served.pipeline
    args = _call_arguments(served, req)
    steps = req.steps or pipe.steps
    state: dict[str, Any] = {"done": 0, "last": None, "first": None}
    start = time.perf_counter()

    def callback(i: int, t: Tensor, x: Tensor, denoised: Tensor) -> None:
        if control is not None and control.cancelled:
            raise Cancelled
        state["done"] = i + 1
        if control is not None:
            control.step = i + 1
        if on_preview is not None or control is not None:
            images = pipe.vae.from_latent(denoised) if pipe.vae is not None else denoised
            state["last"] = images.float().clamp(-1, 1).cpu()
            if state["first"] is None:
                state["first"] = time.perf_counter() - start
            if on_preview is not None:
                on_preview(i + 1, steps, state["last"])

    clash = sorted(set(req.sampler_options) & set(args))
    if clash:
        raise RequestError(f"sampler_options may not set {', '.join(clash)}: those are request fields")
    status = "finished"
    try:
        out = pipe(**args, callback=callback)
        images, settings, nfe = out.images, out.settings, out.settings[0]["denoiser_calls"]
    except Cancelled:
        status = "cancelled"
        images = state["last"] if state["last"] is not None else torch.zeros(0)
        seeds = list(range(req.seed, req.seed + req.n))
        settings = [] if state["last"] is None else [{**req.to_json(), "model": pipe.identity(), "batch_seeds": seeds,
                     "batch_index": i, "cancelled_after_step": state["done"], "steps": steps,
                     "sampler": req.sampler or pipe.sampler, "schedule": req.schedule or pipe.schedule}
                    for i in range(req.n)]
        nfe = -1
    except (PipelineError, ValueError, TypeError) as err:
        raise RequestError(str(err)) from None
    seconds = time.perf_counter() - start
    run_id = next(_run_ids)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (pil, record) in enumerate(zip(Output(images, settings).pil, settings, strict=True)):
        path = out_dir / f"run{run_id:05d}-{i:02d}{'-cancelled' if status == 'cancelled' else ''}.png"
        write_atomic(path, png_bytes(pil, record))
        files.append(path)
    return Run(run_id, req, status, images, settings, files, seconds, state["done"], steps, nfe, state["first"],
               req.sampler or pipe.sampler, None if control is None else control.step_at_cancel)


#: what a compare configuration may set; the prompt, seed and pipeline stay those of the base request
COMPARE_FIELDS = ("sampler", "schedule", "steps", "guidance", "scale", "accelerator", "sampler_options",
                  "guidance_options", "accelerator_options")


def compare(served: dict[str, Served], base: Request, configurations: Sequence[dict[str, Any]], out_dir: str | Path,
            control: RunControl | None = None) -> list[Run]:
    """One prompt and seed through 2 to 4 configurations on identical noise (the noise depends only
    on the seeds), each run measured alone."""
    if not 2 <= len(configurations) <= 4:
        raise RequestError(f"compare takes 2 to 4 configurations, got {len(configurations)}")
    runs = []
    for config in configurations:
        bad = sorted(set(config) - set(COMPARE_FIELDS))
        if bad:
            raise RequestError(f"a compare configuration sets {', '.join(bad)}; it may set {', '.join(COMPARE_FIELDS)}")
        raw = {**base.to_json(), **{k: v for k, v in config.items() if v is not None}}
        req = parse_request(raw, served)
        runs.append(generate(served[req.pipeline], req, out_dir, control=control))
        if runs[-1].status == "cancelled":
            break
    return runs

