"""The web page over served pipelines (gradio): generate with live previews, a progress bar and a
cancel that stops within one step; a per-session history of finished and cancelled runs; PNGs with
their settings inside, restored by dropping one on the page; side-by-side comparison on identical
noise; and a JSON API for scripts. Every choice comes from the registries, so a new sampler,
schedule, guidance method or accelerator appears here without code.

All generation goes through :mod:`difflab.serve.runs`; this module only lays out the page.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import random
import re
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool

import gradio as gr
import numpy as np

from difflab import accel, guidance, samplers, schedules
from difflab.files import FileError, read_settings
from difflab.pipeline import Output
from difflab.serve.runs import (
    MAX_IMAGES,
    NONE,
    RequestError,
    Run,
    RunControl,
    Served,
    compare,
    generate,
    input_path,
    parse_request,
    request_from_settings,
    store_input,
)

IN_TURN = "in turn"
#: small images are shown as pixels, not blurred
CSS = "#status {min-height: 2.5em} img {image-rendering: pixelated}"
#: how many configurations the compare view offers side by side
COMPARE_SLOTS = 4
HISTORY_COLUMNS = ["run", "status", "pipeline", "condition", "seed", "images", "sampler", "schedule", "steps done",
                   "NFE", "guidance", "scale", "accelerator", "seconds", "first preview s"]
COMPARE_COLUMNS = ["configuration", "sampler", "schedule", "steps", "guidance", "scale", "accelerator", "NFE",
                   "seconds", "seconds per image"]
ADVANCED_HELP = ('{"sampler_options": {}, "guidance_options": {}, "accelerator_options": {}} — e.g. '
                 '{"sampler_options": {"eta": 1.0}, "accelerator_options": {"interval": 3}}')


def _advanced(text: str | None) -> dict[str, Any]:
    if not text or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(f"advanced options are not valid JSON ({err}); write {ADVANCED_HELP}") from None
    allowed = {"sampler_options", "guidance_options", "accelerator_options"}
    if not isinstance(value, dict) or set(value) - allowed:
        raise RequestError(f"advanced options take only {', '.join(sorted(allowed))}: write {ADVANCED_HELP}")
    return value


def _advanced_text(sampler_options: dict, guidance_options: dict, accelerator_options: dict) -> str:
    value = {k: v for k, v in (("sampler_options", sampler_options), ("guidance_options", guidance_options),
                               ("accelerator_options", accelerator_options)) if v}
    return json.dumps(value) if value else ""


def _elem(*parts: str) -> str:
    """An element id from names (letters, digits, - and _ only)."""
    return "-".join(re.sub(r"[^A-Za-z0-9_]", "_", part) for part in parts)


def _source_and_mask(value: dict[str, Any] | None, out_dir: Path) -> tuple[str | None, str | None]:
    """The stored names of the editor's background (the source image) and of the mask painted over
    it (any painted pixel repaints), or None for what is not there."""
    if not value or value.get("background") is None:
        return None, None
    from PIL import Image

    background = value["background"]
    painted = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        painted = alpha if painted is None else painted | alpha
    mask = None
    if painted is not None and painted.any():
        mask = store_input(Image.fromarray((painted * 255).astype(np.uint8)), out_dir)
    return store_input(background, out_dir), mask


def _editor_value(out_dir: Path, image: str | None, mask: str | None) -> dict[str, Any] | None:
    """The editor showing a stored source image with its mask as a painted (white) layer."""
    if image is None:
        return None
    layers = []
    if mask is not None:
        from PIL import Image

        with Image.open(input_path(out_dir, mask)) as im:
            alpha = np.asarray(im.convert("L"))
        layer = np.dstack([np.full_like(alpha, 255)] * 3 + [alpha])
        layers.append(str(input_path(out_dir, store_input(Image.fromarray(layer), out_dir))))
    return {"background": str(input_path(out_dir, image)), "layers": layers, "composite": None}


def _history_row(run: Run) -> list[Any]:
    r = run.request
    condition = r.prompt if r.prompt else (IN_TURN if r.class_label is None else str(r.class_label))
    record = run.settings[0] if run.settings else {}
    return [run.id, run.status, r.pipeline, condition, r.seed, r.n, run.sampler, record.get("schedule", ""),
            f"{run.steps_done}/{run.steps}", run.nfe if run.nfe >= 0 else "", record.get("guidance", r.guidance or ""),
            r.scale if r.scale is not None else "", r.accelerator, round(run.seconds, 3),
            "" if run.first_preview_seconds is None else round(run.first_preview_seconds, 3)]


def _status(run: Run) -> str:
    if run.status == "cancelled":
        pressed = "" if run.step_at_cancel is None else f" (cancel arrived at step {run.step_at_cancel})"
        return (f"**cancelled** after step {run.steps_done} of {run.steps}{pressed} · {run.seconds:.2f} s · "
                f"the last preview is kept in the history")
    per_image = run.seconds / max(1, run.request.n)
    first = "" if run.first_preview_seconds is None else f" · first preview {run.first_preview_seconds:.2f} s"
    return (f"**finished** run #{run.id}: {run.request.n} image(s), {run.steps} steps, {run.nfe} NFE · "
            f"{run.seconds:.2f} s ({per_image:.2f} s per image){first}")


class _Sessions:
    """The running generation of each browser session, so its cancel reaches that run only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, RunControl] = {}

    def start(self, session: str) -> RunControl:
        control = RunControl()
        with self._lock:
            self._running[session] = control
        return control

    def cancel(self, session: str) -> bool:
        with self._lock:
            control = self._running.get(session)
        if control is None:
            return False
        control.cancel()
        return True

    def finish(self, session: str, control: RunControl) -> None:
        with self._lock:
            if self._running.get(session) is control:
                del self._running[session]


def build_app(served: dict[str, Served], out_dir: str | Path, *, concurrency: int = 1) -> gr.Blocks:
    """The page over ``served`` pipelines, writing PNGs to ``out_dir``; ``concurrency`` generations
    run at once (the rest wait in the queue)."""
    out_dir = Path(out_dir)
    sessions = _Sessions()
    first = next(iter(served.values()))
    sampler_names, schedule_names = samplers.available(), schedules.available()
    guidance_names, accel_names = [NONE, *guidance.available()], [NONE, *accel.REGISTRY.available()]
    brush_size = max(1, min(min(s.pipeline.image_size) for s in served.values()) // 8)  # in image pixels

    def pipeline_view(name: str) -> dict[str, Any]:
        """The controls' values and visibility for one pipeline's defaults."""
        s = served[name]
        pipe = s.pipeline
        method, scale = s.default_guidance
        classes = [IN_TURN, *map(str, range(pipe.num_classes or 0))]
        return {"prompt": gr.update(visible=s.conditioning == "text"),
                "class_label": gr.update(visible=s.conditioning == "class", choices=classes, value=IN_TURN),
                "sampler": pipe.sampler, "schedule": pipe.schedule, "steps": pipe.steps, "guidance": method,
                "scale": scale}

    with gr.Blocks(title="difflab", analytics_enabled=False) as app:
        gr.Markdown("## difflab — sample, compare and reproduce\n"
                    "Every image's PNG carries its full settings: drop one on *Restore* to get them back. "
                    "The JSON API is documented in the *API* tab.")
        history = gr.State([])
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1, min_width=320):
                    view = pipeline_view(first.name)
                    pipeline = gr.Dropdown(list(served), value=first.name, label="pipeline", elem_id="pipeline")
                    prompt = gr.Textbox(label="prompt", elem_id="prompt", lines=2,
                                        visible=first.conditioning == "text")
                    class_label = gr.Dropdown(view["class_label"]["choices"], value=IN_TURN, label="class",
                                              elem_id="class_label", visible=first.conditioning == "class")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed", min_width=100)
                        randomise = gr.Button("random seed", elem_id="randomise", size="sm")
                    n = gr.Number(value=4, precision=0, label=f"images (1 to {MAX_IMAGES})", elem_id="n")
                    with gr.Row():
                        sampler = gr.Dropdown(sampler_names, value=view["sampler"], label="sampler",
                                              elem_id="sampler")
                        schedule = gr.Dropdown(schedule_names, value=view["schedule"], label="schedule",
                                               elem_id="schedule")
                        steps = gr.Number(value=view["steps"], precision=0, label="steps", elem_id="steps")
                    with gr.Row():
                        method = gr.Dropdown(guidance_names, value=view["guidance"], label="guidance",
                                             elem_id="guidance")
                        scale = gr.Number(value=view["scale"], label="guidance scale", elem_id="scale")
                        accelerator = gr.Dropdown(accel_names, value=NONE, label="accelerator",
                                                  elem_id="accelerator")
                    advanced = gr.Textbox(label="advanced options (JSON)", placeholder=ADVANCED_HELP,
                                          elem_id="advanced")
                    with gr.Accordion("image to image, inpainting and adapters", open=False,
                                      elem_id="extras") as extras:
                        source = gr.ImageEditor(
                            label="source image: upload one for img2img; paint over it where it should be repainted "
                                  "(inpainting: painted = repaint, the rest is kept exactly)",
                            type="pil", image_mode="RGBA", sources=["upload", "clipboard"], format="png",
                            transforms=(), layers=False, height=300, elem_id="source",
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=brush_size))
                        strength = gr.Slider(0, 1, value=0, step=0.05, elem_id="strength",
                                             label="strength (0: the default, 0.8 img2img and 1 inpainting)")
                        lora_sliders = []  # (pipeline, LoRA name, slider): every served LoRA, shown on its pipeline
                        for s in served.values():
                            for name in s.loras:
                                lora_sliders.append((s.name, name, gr.Slider(
                                    -2, 2, value=0, step=0.05, label=f"LoRA {name} scale (0: off)",
                                    elem_id=_elem("lora", s.name, name), visible=s.name == first.name)))
                        control_slots = []  # (pipeline, ControlNet name, row, image, scale)
                        for s in served.values():
                            for name in s.controlnets:
                                with gr.Row(visible=s.name == first.name) as row:
                                    picture = gr.Image(type="pil", image_mode=None, format="png", height=160,
                                                       label=f"ControlNet {name}: control image",
                                                       sources=["upload", "clipboard"],
                                                       elem_id=_elem("control", s.name, name))
                                    weight = gr.Number(value=1.0, label="control scale",
                                                       elem_id=_elem("control_scale", s.name, name))
                                control_slots.append((s.name, name, row, picture, weight))
                    with gr.Row():
                        run_button = gr.Button("Generate", variant="primary", elem_id="generate")
                        cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    restore = gr.File(label="Restore: drop a difflab PNG here", file_types=[".png"], type="filepath",
                                      elem_id="restore")
                with gr.Column(scale=2):
                    status = gr.Markdown("", elem_id="status")
                    gallery = gr.Gallery(label="images (live preview while sampling)", columns=4, format="png",
                                         elem_id="gallery", height=420, object_fit="contain")
                    downloads = gr.File(label="PNGs with their settings", file_count="multiple",
                                        elem_id="downloads", interactive=False)
                    record = gr.JSON(label="settings of the first image", elem_id="record")
        with gr.Tab("History"):
            history_gallery = gr.Gallery(label="every run, finished or cancelled", columns=6, format="png",
                                         elem_id="history", object_fit="contain")
            history_table = gr.Dataframe(headers=HISTORY_COLUMNS, value=[], elem_id="history_table",
                                         interactive=False, wrap=True)
        with gr.Tab("Compare"):
            gr.Markdown("One prompt and seed (from *Generate*) through up to four configurations on identical "
                        "noise; one column per configuration.")
            slots = []
            presets = [(view["sampler"], view["steps"]), ("euler", view["steps"]), ("heun", view["steps"] // 2 or 1),
                       ("dpmpp_2m", max(1, view["steps"] // 2))]
            for k in range(COMPARE_SLOTS):
                with gr.Row():
                    use = gr.Checkbox(value=k < 2, label=f"configuration {k + 1}", elem_id=f"use{k}")
                    c_sampler = gr.Dropdown(sampler_names, value=presets[k][0], label="sampler",
                                            elem_id=f"sampler{k}")
                    c_steps = gr.Number(value=presets[k][1], precision=0, label="steps", elem_id=f"steps{k}")
                    c_method = gr.Dropdown(guidance_names, value=view["guidance"], label="guidance",
                                           elem_id=f"guidance{k}")
                    c_scale = gr.Number(value=view["scale"], label="scale", elem_id=f"scale{k}")
                    c_accel = gr.Dropdown(accel_names, value=NONE, label="accelerator", elem_id=f"accelerator{k}")
                slots.append((use, c_sampler, c_steps, c_method, c_scale, c_accel))
            compare_button = gr.Button("Compare", variant="primary", elem_id="compare")
            compare_gallery = gr.Gallery(label="one column per configuration", columns=2, format="png",
                                         elem_id="compare_gallery", object_fit="contain")
            compare_table = gr.Dataframe(headers=COMPARE_COLUMNS, value=[], elem_id="compare_table",
                                         interactive=False)
        with gr.Tab("API"):
            gr.Markdown(api_help(served))

        adapter_inputs = [*[slider for _, _, slider in lora_sliders],
                          *[c for _, _, _, picture, weight in control_slots for c in (picture, weight)]]
        controls = [pipeline, prompt, class_label, seed, n, sampler, schedule, steps, method, scale, accelerator,
                    advanced, source, strength, *adapter_inputs]

        def raw_request(name, text, label, seed_value, count, sampler_name, schedule_name, step_count,
                        guidance_name, scale_value, accelerator_name, advanced_text, editor, strength_value,
                        *adapter_values) -> dict[str, Any]:
            s = served.get(name)
            image, mask = _source_and_mask(editor, out_dir)
            lora_values = adapter_values[:len(lora_sliders)]
            control_values = adapter_values[len(lora_sliders):]
            loras = {lora: value for (owner, lora, _), value in zip(lora_sliders, lora_values, strict=True)
                     if owner == name and value}
            chosen = []
            for k, (owner, net, _, _, _) in enumerate(control_slots):
                picture, weight = control_values[2 * k], control_values[2 * k + 1]
                if owner == name and picture is not None:
                    chosen.append({"controlnet": net, "image": store_input(picture, out_dir),
                                   "scale": 1.0 if weight is None else weight})
            return {"pipeline": name, "prompt": text if s is not None and s.conditioning == "text" else "",
                    "class_label": None if (s is None or s.conditioning != "class" or label in (None, IN_TURN))
                    else label, "seed": seed_value, "n": count, "sampler": sampler_name, "schedule": schedule_name,
                    "steps": step_count, "guidance": guidance_name, "scale": scale_value,
                    "accelerator": accelerator_name, "image": image, "mask": mask,
                    "strength": strength_value if image is not None and strength_value else None, "loras": loras,
                    "controls": chosen,
                    **_advanced(advanced_text)}

        def adapter_visibility(name: str) -> list[Any]:
            return ([gr.update(visible=owner == name) for owner, _, _ in lora_sliders]
                    + [gr.update(visible=owner == name) for owner, _, _, _, _ in control_slots])

        adapter_views = [*[slider for _, _, slider in lora_sliders], *[row for _, _, row, _, _ in control_slots]]

        def on_pipeline(name: str):
            v = pipeline_view(name)
            return [v["prompt"], v["class_label"], v["sampler"], v["schedule"], v["steps"], v["guidance"], v["scale"],
                    *adapter_visibility(name)]

        pipeline.input(on_pipeline, pipeline,
                       [prompt, class_label, sampler, schedule, steps, method, scale, *adapter_views],
                       api_visibility="private")
        randomise.click(lambda: random.randrange(2**31), None, seed, api_visibility="private", queue=False)

        def history_outputs(runs: list[Run]):
            shown = [(str(run.files[0]), run.summary()) for run in reversed(runs) if run.files]
            return runs, shown, [_history_row(run) for run in reversed(runs)]

        def run_generate(values: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008
            runs = values[history]
            try:
                req = parse_request(raw_request(*[values[c] for c in controls]), served, out_dir)
            except RequestError as err:
                raise gr.Error(str(err), print_exception=False) from None
            session = request.session_hash if request is not None else "api"
            control = sessions.start(session)
            updates: queue.Queue = queue.Queue()

            def worker() -> None:
                try:
                    run = generate(served[req.pipeline], req, out_dir, control=control,
                                   on_preview=lambda i, total, images: updates.put(("preview", i, total, images)))
                    updates.put(("done", run))
                except Exception as err:  # the server keeps running: the error goes to the page
                    updates.put(("error", err))

            thread = threading.Thread(target=worker, daemon=True, name=f"difflab-run-{session}")
            thread.start()
            try:
                while True:
                    item = updates.get()
                    while item[0] == "preview" and not updates.empty():  # show only the newest preview
                        item = updates.get()
                    if item[0] == "preview":
                        _, i, total, images = item
                        progress((i, total), desc="sampling", unit="steps")
                        yield (Output(images).pil, f"step {i}/{total} · preview of the denoised estimate",
                               gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
                        continue
                    if item[0] == "error":
                        err = item[1]
                        message = str(err) if isinstance(err, RequestError) else f"the run failed: {err!r}"
                        raise gr.Error(message, print_exception=not isinstance(err, RequestError))
                    run = item[1]
                    runs = [*runs, run]
                    state, shown, rows = history_outputs(runs)
                    yield ([str(f) for f in run.files], _status(run), [str(f) for f in run.files] or None,
                           run.settings[0] if run.settings else None, state, shown, rows)
                    return
            finally:
                control.cancel()  # the page went away or the run ended: a still-running worker stops at its next step
                thread.join()
                sessions.finish(session, control)

        run_button.click(run_generate, {*controls, history},
                                      [gallery, status, downloads, record, history, history_gallery, history_table],
                                      concurrency_limit=concurrency, concurrency_id="sampling",
                                      api_visibility="private", show_progress="minimal")

        def cancel(request: gr.Request):
            if not sessions.cancel(request.session_hash):
                gr.Info("nothing is running in this session")

        cancel_button.click(cancel, None, None, queue=False, api_visibility="private")

        def on_restore(path: str | None):
            if not path:
                return [gr.skip()] * (len(controls) + 2 + len(adapter_views))
            try:
                req = request_from_settings(read_settings(path), served, out_dir)
            except (RequestError, FileError) as err:
                raise gr.Error(str(err), print_exception=False) from None
            view = pipeline_view(req.pipeline)
            label = IN_TURN if req.class_label is None else str(req.class_label)
            controls_by_net = {c["controlnet"]: c for c in req.controls}
            control_values = []
            for owner, net, _, _, _ in control_slots:
                chosen = controls_by_net.get(net) if owner == req.pipeline else None
                control_values += [None if chosen is None else str(input_path(out_dir, chosen["image"])),
                                   1.0 if chosen is None else chosen["scale"]]
            return [req.pipeline, gr.update(value=req.prompt, visible=view["prompt"]["visible"]),
                    gr.update(choices=view["class_label"]["choices"], value=label,
                              visible=view["class_label"]["visible"]),
                    req.seed, req.n, req.sampler, req.schedule, req.steps, req.guidance or view["guidance"],
                    req.scale if req.scale is not None else view["scale"], req.accelerator,
                    _advanced_text(req.sampler_options, req.guidance_options, req.accelerator_options),
                    _editor_value(out_dir, req.image, req.mask), req.strength or 0,
                    *[req.loras.get(lora, 0.0) if owner == req.pipeline else 0.0 for owner, lora, _ in lora_sliders],
                    *control_values,
                    f"restored the settings of {Path(path).name} ({req.pipeline}, seed {req.seed}, {req.n} "
                    "image(s)); press Generate to make it again",
                    gr.update(open=bool(req.image or req.loras or req.controls)), *adapter_visibility(req.pipeline)]

        restore.upload(on_restore, restore, [*controls, status, extras, *adapter_views], api_visibility="private")

        def run_compare(*values):
            base_values, slot_values = values[:len(controls)], values[len(controls):]
            configurations = []
            for k in range(COMPARE_SLOTS):
                use, c_sampler, c_steps, c_method, c_scale, c_accel = slot_values[6 * k: 6 * k + 6]
                if use:
                    configurations.append({"sampler": c_sampler, "steps": c_steps, "guidance": c_method,
                                           "scale": c_scale, "accelerator": c_accel})
            try:
                base = parse_request(raw_request(*base_values), served, out_dir)
                runs = compare(served, base, configurations, out_dir)
            except RequestError as err:
                raise gr.Error(str(err), print_exception=False) from None
            images = [(str(run.files[j]), f"{k + 1}: {run.sampler} · {run.nfe} NFE · {run.seconds:.2f} s")
                      for j in range(base.n) for k, run in enumerate(runs)]
            rows = [[k + 1, run.sampler, run.settings[0]["schedule"], run.steps, run.settings[0]["guidance"],
                     run.request.scale, run.request.accelerator, run.nfe, round(run.seconds, 3),
                     round(run.seconds / base.n, 3)] for k, run in enumerate(runs)]
            return gr.update(value=images, columns=len(runs)), rows

        compare_button.click(run_compare, [*controls, *[c for slot in slots for c in slot]],
                             [compare_gallery, compare_table], concurrency_limit=concurrency,
                             concurrency_id="sampling", api_visibility="private")

        def api_generate(request: dict) -> dict:
            """Generate images. `request`: {"pipeline", "prompt" or "class_label", "seed", "n", "sampler",
            "schedule", "steps", "guidance", "scale", "accelerator", "sampler_options", "guidance_options",
            "accelerator_options"} (all optional but the condition). Returns the PNGs (base64, settings inside)
            with each image's settings, the network evaluations and the seconds taken."""
            try:
                req = parse_request(request, served, out_dir)
                run = generate(served[req.pipeline], req, out_dir)
            except RequestError as err:
                raise gr.Error(str(err), print_exception=False) from None
            return {"images": [base64.b64encode(Path(f).read_bytes()).decode() for f in run.files],
                    "settings": run.settings, "nfe": run.nfe, "seconds": run.seconds,
                    "pipeline": req.pipeline}

        def api_pipelines() -> dict:
            """The served pipelines with their conditioning and defaults, and every registered choice."""
            return {"pipelines": {name: {"conditioning": s.conditioning, "num_classes": s.pipeline.num_classes,
                                         "sampler": s.pipeline.sampler, "schedule": s.pipeline.schedule,
                                         "steps": s.pipeline.steps, "guidance": s.default_guidance[0],
                                         "scale": s.default_guidance[1], "model": s.pipeline.identity(),
                                         "image_size": list(s.pipeline.image_size), "loras": list(s.loras),
                                         "controlnets": {name: {"control_channels": net.settings["control_channels"]}
                                                         for name, net in s.controlnets.items()}}
                                  for name, s in served.items()},
                    "samplers": sampler_names, "schedules": schedule_names, "guidance": guidance_names,
                    "accelerators": accel_names, "max_images": MAX_IMAGES}

        gr.api(api_generate, api_name="generate", concurrency_limit=concurrency, concurrency_id="sampling")
        gr.api(api_pipelines, api_name="pipelines", queue=False)
    return app


def api_help(served: dict[str, Served]) -> str:
    name = next(iter(served))
    example = {"pipeline": name, "seed": 0, "n": 2, "steps": 20}
    if served[name].conditioning == "text":
        example["prompt"] = "a red circle"
    elif served[name].conditioning == "class":
        example["class_label"] = 3
    body = json.dumps({"data": [example]})
    return f"""### JSON API

Two calls: `POST /gradio_api/call/generate` with the request in `data` returns an `event_id`;
`GET /gradio_api/call/generate/EVENT_ID` streams the result (`event: complete`, then `data:` with a
JSON list holding one object: `images` — PNGs in base64 with their settings inside —, `settings`,
`nfe`, `seconds`), or `event: error` with the message when the request was bad.

```bash
EVENT=$(curl -s -X POST http://127.0.0.1:PORT/gradio_api/call/generate \\
  -H 'Content-Type: application/json' -d '{body}' \\
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["event_id"])')
curl -s -N http://127.0.0.1:PORT/gradio_api/call/generate/$EVENT
```

`POST /gradio_api/call/pipelines` with `{{"data": []}}` lists the pipelines, their defaults and every
sampler, schedule, guidance method and accelerator. From Python, `gradio_client.Client(URL).predict(REQUEST,
api_name="/generate")` does both calls. Request fields: `pipeline`, `prompt` (text pipelines),
`class_label` (class-conditional; -1 is no class), `seed`, `n` (1 to {MAX_IMAGES}), `sampler`, `schedule`,
`steps`, `guidance`, `scale`, `accelerator`, `sampler_options`, `guidance_options`, `accelerator_options`;
and for editing and adapters: `image` (a PNG in base64, the pipeline's size: img2img), `mask` (a PNG in
base64, white repaints: inpainting), `strength` (0 to 1; 0.8 img2img, 1 inpainting by default),
`loras` (`{{"NAME": scale}}`) and `controls` (`[{{"controlnet": NAME, "image": PNG_BASE64, "scale": 1.0}}]`),
with the names `pipelines` lists. A returned image's `settings` hold `serve_request`, the request with its
images by the names this server keeps them under: sending it back makes the same PNG.
"""
