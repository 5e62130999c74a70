"""Runs of a served pipeline, without any web framework: a request checked into sampling
arguments, sampling with a preview of the denoised estimate at every step and a cancel that stops
within one step, and the record of each run — finished or cancelled — with PNGs that carry their
settings (:func:`difflab.files.png_bytes`), so a PNG dropped back restores the request that made it.

A request may also carry a source image (img2img at a strength, or inpainting where its mask is
white), LoRAs with their scales and ControlNets with their control images, each adapter loaded for
the pipeline it was trained on. Images arrive as base64 PNGs (the API) or uploads (the page) and are
kept, named by their content, in the output folder's ``inputs/``: a run's record names them, so its
PNG restores the whole request, source and control images included.

The web page (:mod:`difflab.serve.app`) and its JSON API are thin layers over :func:`generate`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import inspect
import io
import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from difflab import accel, guidance, samplers, schedules
from difflab.files import FileError, png_bytes, write_atomic
from difflab.interop import open_pipeline
from difflab.pipeline import Output, Pipeline, PipelineError

Tensor = torch.Tensor

#: what one request may ask for at most (a server shared by several people stays responsive)
MAX_IMAGES = 16
MAX_STEPS = 500
#: the choice that means "no guidance" / "no accelerator" in a request
NONE = "none"
#: the folder (inside the output folder) where a request's images are kept, named by their content
INPUTS = "inputs"
MAX_INPUT_BYTES = 8 * 2**20
MAX_LORA_SCALE = 10.0


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
    """One pipeline on the page: its name, the loaded pipeline, and the LoRAs and ControlNets
    trained on it (by folder name)."""

    name: str
    pipeline: Pipeline
    loras: dict[str, Any] = field(default_factory=dict)
    controlnets: dict[str, Any] = field(default_factory=dict)


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


def _folder_name(path: Path) -> str:
    resolved = path.resolve()
    return resolved.name if resolved.name != "final" else resolved.parent.name


def _attach(served: dict[str, Served], path: str | Path, kind: str) -> None:
    """Load the LoRA or ControlNet folder ``path`` onto the served pipeline it was trained on (the
    identity in its JSON; the only pipeline when it names none)."""
    from difflab.adapters import ControlError, ControlNet, LoRA, LoRAError
    from difflab.files import read_json

    path = Path(path)
    meta_file = path / f"{kind}.json"
    flag = "--lora" if kind == "lora" else "--controlnet"
    if not meta_file.is_file():
        raise ServeError(f"{flag} {path}: no {kind}.json there; give a folder written by `difflab adapt` or "
                         f"{'LoRA' if kind == 'lora' else 'ControlNet'}.save_pretrained")
    try:
        made_for = read_json(meta_file, f"{kind} config").get("base_model", "")
    except (FileError, AttributeError) as err:
        raise ServeError(f"{flag} {path}: {err}") from None
    owners = [s for s in served.values() if s.pipeline.identity() == made_for] if made_for else (
        list(served.values()) if len(served) == 1 else [])
    if not owners:
        have = ", ".join(f"{s.name} ({s.pipeline.identity()})" for s in served.values())
        why = f"was trained on weights {made_for}" if made_for else "names no base model"
        raise ServeError(f"{flag} {path} {why}; no served pipeline matches (serving {have})")
    owner = owners[0]
    cls, table = (LoRA, owner.loras) if kind == "lora" else (ControlNet, owner.controlnets)
    try:
        adapter = cls.from_pretrained(path, owner.pipeline.network, base_identity=owner.pipeline.identity())
    except (LoRAError, ControlError, FileError, KeyError, RuntimeError) as err:
        raise ServeError(f"{flag} {path} failed to load: {err}") from None
    name = _folder_name(path)
    while name in table:
        name += "'"
    table[name] = adapter


def load_served(paths: Sequence[str | Path], *, loras: Sequence[str | Path] = (),
                controlnets: Sequence[str | Path] = ()) -> dict[str, Served]:
    """Every pipeline folder loaded (text encoders too), named by its folder, with each LoRA and
    ControlNet folder on the pipeline it was trained on; a :class:`ServeError` names the first that
    is not a pipeline, fails to load or fits no served pipeline, before anything is served."""
    served: dict[str, Served] = {}
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise ServeError(f"{path} is not a folder: give pipeline folders (written by Pipeline.save_pretrained, "
                             "by training as OUT_DIR/final, or by `difflab export`)")
        try:
            pipe = open_pipeline(path)
            if pipe.text_encoder_config is not None:
                pipe.text_encoder()  # loaded now, so a missing encoder fails here and not on the first request
        except (PipelineError, FileError, ValueError, OSError, RuntimeError, ImportError) as err:
            raise ServeError(f"{path} failed to load as a pipeline: {err}") from None
        name = _folder_name(path)
        while name in served:
            name += "'"
        served[name] = Served(name, pipe)
    if not served:
        raise ServeError("give at least one pipeline folder to serve")
    for kind, folders in (("lora", loras), ("controlnet", controlnets)):
        for folder in folders:
            _attach(served, folder, kind)
    return served


def canonical_png(image: Any) -> bytes:
    """A PIL image as PNG bytes that depend on its pixels only: opaque images lose their alpha,
    grey ones are stored grey, so the same picture arriving as L, RGB or RGBA is one file."""
    import numpy as np
    from PIL import Image

    rgba = np.asarray(image.convert("RGBA"))
    if (rgba[..., 3] == 255).all():
        rgb = rgba[..., :3]
        grey = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        canonical = Image.fromarray(np.ascontiguousarray(rgb[..., 0]) if grey else np.ascontiguousarray(rgb))
    else:
        canonical = Image.fromarray(rgba)
    return png_bytes(canonical)


def store_input(data: bytes | Any, out_dir: str | Path) -> str:
    """Keep an image a request brought (PNG/JPEG bytes, or a PIL image) in ``out_dir/inputs`` as a
    PNG named by its pixels (:func:`canonical_png`); returns that name, which requests and records
    use to refer to it."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(data, bytes | bytearray):
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                png = canonical_png(im)
        else:
            png = canonical_png(data)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise RequestError(f"an image in the request is not a readable PNG or JPEG ({err})") from None
    name = hashlib.sha256(png).hexdigest()[:16] + ".png"
    folder = Path(out_dir) / INPUTS
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / name).is_file():
        write_atomic(folder / name, png)
    return name


_STORED = re.compile(r"[0-9a-f]{16}\.png")


def _image_ref(value: Any, what: str, out_dir: str | Path | None) -> str:
    """The stored name of an image given as base64 (optionally a ``data:`` URL) or as the name of
    an image this server already keeps."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{what} must be a PNG in base64 (or the name of an image this server keeps), "
                           f"got {type(value).__name__}")
    if out_dir is None:
        raise RequestError(f"{what}: this server keeps no images (no output folder)")
    if _STORED.fullmatch(value):
        if not (Path(out_dir) / INPUTS / value).is_file():
            raise RequestError(f"{what} {value} is not an image this server keeps (it may have been made by "
                               "another server); send the image itself in base64")
        return value
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    if len(text) > MAX_INPUT_BYTES * 4 // 3 + 4:
        raise RequestError(f"{what} is larger than {MAX_INPUT_BYTES // 2**20} MB")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is neither base64 image data nor the name of an image this server keeps") \
            from None
    return store_input(data, out_dir)


def input_path(out_dir: str | Path, name: str) -> Path:
    """Where the stored image ``name`` is."""
    return Path(out_dir) / INPUTS / name


def _number(value: Any, what: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{what} must be a number, got {value!r}") from None
    if not low <= number <= high:
        raise RequestError(f"{what} must be from {low:g} to {high:g}, got {number:g}")
    return number


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
    image: str | None = None  # a source image (stored name): img2img, or inpainting with a mask
    mask: str | None = None  # white repaints, black keeps
    strength: float | None = None  # None: 0.8 for img2img, 1 for inpainting
    loras: dict[str, float] = field(default_factory=dict)  # LoRA name -> scale
    controls: list[dict[str, Any]] = field(default_factory=list)  # {"controlnet", "image", "scale"}

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


def parse_request(raw: dict[str, Any], served: dict[str, Served], out_dir: str | Path | None = None) -> Request:
    """A request from JSON-like values (the page's controls or an API call), every field checked:
    a :class:`RequestError` says which one is wrong and what it may be. Images it carries are kept
    in ``out_dir/inputs`` (:func:`store_input`)."""
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
    _parse_images_and_adapters(raw, req, served[name], out_dir)
    return req


def _parse_images_and_adapters(raw: dict[str, Any], req: Request, served: Served, out_dir: str | Path | None) -> None:
    if raw.get("image") not in (None, ""):
        req.image = _image_ref(raw["image"], "image", out_dir)
    if raw.get("mask") not in (None, ""):
        if req.image is None:
            raise RequestError("a mask needs the image it repaints: give `image` too")
        req.mask = _image_ref(raw["mask"], "mask", out_dir)
    if raw.get("strength") not in (None, ""):
        if req.image is None:
            raise RequestError("strength applies to a source image (img2img or inpainting): give `image`, or "
                               "leave strength out")
        req.strength = _number(raw["strength"], "strength", 0.0, 1.0)
        if req.strength == 0:
            raise RequestError("strength must be above 0 (0 would return the image unchanged)")
    if req.image is not None and req.accelerator != NONE:
        raise RequestError("accelerators apply to generation from noise; set accelerator to none for an "
                           "img2img or inpainting run")
    loras = raw.get("loras") or {}
    if not isinstance(loras, dict):
        raise RequestError(f"loras must be an object of LoRA names and scales, got {loras!r}")
    for lora, scale in loras.items():
        if lora not in served.loras:
            have = ", ".join(served.loras) or "none"
            raise RequestError(f"unknown LoRA {lora!r} for {served.name}; it has {have} (serve more with --lora)")
        value = _number(scale, f"LoRA {lora}'s scale", -MAX_LORA_SCALE, MAX_LORA_SCALE)
        if value != 0:  # scale 0 is no LoRA: left out, so the record is the plain model's
            req.loras[lora] = value
    controls = raw.get("controls") or []
    if not isinstance(controls, list):
        raise RequestError("controls must be a list of {\"controlnet\": NAME, \"image\": PNG, \"scale\": 1.0}")
    for control in controls:
        if not isinstance(control, dict) or set(control) - {"controlnet", "image", "scale"}:
            raise RequestError(f"a control is {{\"controlnet\": NAME, \"image\": PNG, \"scale\": 1.0}}, got "
                               f"{control!r}")
        net = control.get("controlnet")
        if net not in served.controlnets:
            have = ", ".join(served.controlnets) or "none"
            raise RequestError(f"unknown ControlNet {net!r} for {served.name}; it has {have} (serve more with "
                               "--controlnet)")
        if control.get("image") in (None, ""):
            raise RequestError(f"ControlNet {net} needs a control image")
        scale = _number(control.get("scale", 1.0), f"ControlNet {net}'s scale", -MAX_LORA_SCALE, MAX_LORA_SCALE)
        if scale != 0:
            req.controls.append({"controlnet": net, "image": _image_ref(control["image"], f"{net}'s control image",
                                                                        out_dir), "scale": scale})


def request_from_settings(settings: dict[str, Any], served: dict[str, Served],
                          out_dir: str | Path | None = None) -> Request:
    """The request that made an image, from its settings record (a PNG's or a JSON's); the pipeline
    is the served one whose weights made it. A served run's record carries its request (with the
    names of the images it kept in ``out_dir/inputs``); a record of ``difflab sample`` is read back
    field by field."""
    if not isinstance(settings, dict) or "batch_seeds" not in settings:
        raise RequestError("these are not an image's settings as difflab writes them (no batch_seeds)")
    made_by = settings.get("model")
    names = [s.name for s in served.values() if s.pipeline.identity() == made_by]
    if not names:
        raise RequestError(f"this image was made by a model (weights {made_by}) that this server does not serve")
    if isinstance(settings.get(SERVE_REQUEST), dict):
        return parse_request({**settings[SERVE_REQUEST], "pipeline": names[0]}, served, out_dir)
    if "edit" in settings or "adapters" in settings or "image_prompt" in settings:
        raise RequestError("this image is an edit or used adapters and was not made by `difflab serve`: restore it "
                           "with `difflab sample --settings` or the Python API, which take its source images and "
                           "adapters")
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
#: the key of a served image's record that holds the whole request (images by their stored names)
SERVE_REQUEST = "serve_request"


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


def _adapter_arguments(served: Served, req: Request, out_dir: str | Path) -> dict[str, Any]:
    """The ``loras`` and ``controls`` of the pipeline call (one control image for every image)."""
    from difflab.adapters import Control

    loras = [(served.loras[name], scale) for name, scale in req.loras.items()]
    controls = []
    for c in req.controls:
        net = served.controlnets[c["controlnet"]]
        picture = _read_input(served, out_dir, c["image"], net.settings["control_channels"],
                              f"{c['controlnet']}'s control image")
        controls.append(Control(net, ((picture + 1) / 2).expand(req.n, -1, -1, -1), float(c["scale"])))
    return {"loras": loras or None, "controls": controls or None}


def _read_input(served: Served, out_dir: str | Path, name: str, channels: int, what: str) -> Tensor:
    """A stored image as (1, channels, H, W) in [-1, 1], checked to be the pipeline's size."""
    from difflab.data.folder import read_images

    try:
        picture = read_images([str(input_path(out_dir, name))], channels, what)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise RequestError(f"{what}: {err}") from None
    height, width = served.pipeline.image_size
    if tuple(picture.shape[-2:]) != (height, width):
        raise RequestError(f"{what} is {picture.shape[-1]}x{picture.shape[-2]} pixels; {served.name} makes "
                           f"{width}x{height} images: resize it to that")
    return picture


def _edit_call(served: Served, req: Request, out_dir: str | Path, args: dict[str, Any]) -> Callable[..., Output]:
    """The pipeline's edit (img2img, or inpainting with the mask) for a request with a source image."""
    image = _read_input(served, out_dir, req.image, served.pipeline.image_channels, "the source image")
    mask = None if req.mask is None else (_read_input(served, out_dir, req.mask, 1, "the mask") + 1) / 2
    keys = ("seed", "steps", "sampler", "schedule", "guidance", "guidance_options", "batch_size", "prompts",
            "class_labels", "loras", "controls")
    kwargs = {k: args[k] for k in keys if k in args}
    if "class_labels" in kwargs:
        kwargs["class_labels"] = [kwargs["class_labels"]] * req.n
    sampler_options = {k: v for k, v in args.items() if k not in keys and k not in ("n", "accelerator")}
    source = str(input_path(out_dir, req.image).resolve())
    masks = None if req.mask is None else [str(input_path(out_dir, req.mask).resolve())] * req.n

    def call(callback: Callable) -> Output:
        return served.pipeline.edit(image.expand(req.n, -1, -1, -1),
                                    mask=None if mask is None else mask.expand(req.n, -1, -1, -1),
                                    strength=req.strength, sources=[source] * req.n, mask_sources=masks,
                                    callback=callback, **kwargs, **sampler_options)
    return call


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
        args.update(_adapter_arguments(served, req, out_dir))
        call = _edit_call(served, req, out_dir, args) if req.image else (lambda cb: pipe(**args, callback=cb))
        out = call(callback)
        settings = [{**record, SERVE_REQUEST: req.to_json()} for record in out.settings]
        images, nfe = out.images, out.settings[0].get("denoiser_calls", -1)
    except Cancelled:
        status = "cancelled"
        images = state["last"] if state["last"] is not None else torch.zeros(0)
        seeds = list(range(req.seed, req.seed + req.n))
        settings = [] if state["last"] is None else [{SERVE_REQUEST: req.to_json(), "model": pipe.identity(),
                     "batch_seeds": seeds, "batch_index": i, "cancelled_after_step": state["done"], "steps": steps,
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
        req = parse_request(raw, served, out_dir)
        runs.append(generate(served[req.pipeline], req, out_dir, control=control))
        if runs[-1].status == "cancelled":
            break
    return runs

