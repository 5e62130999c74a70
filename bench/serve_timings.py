"""`difflab serve` on trained pipelines (issue #20): time to the first preview and per image, through
the same `generate` the page and the JSON API call (previews decoded every step, as the page shows
them), and the page's own overhead measured over the JSON API on a server started here.

Train first (alone):  difflab train digits --set out_dir=runs/digits ; difflab train shapes_t2i ...
Run by hand, alone:   python bench/serve_timings.py --pipeline runs/digits/final --pipeline runs/shapes_t2i/final
Writes bench/results/serve_timings.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from difflab.serve import generate, load_served, parse_request, start

RESULTS = Path(__file__).parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _condition(served) -> dict:
    return {"prompt": "a red circle"} if served.conditioning == "text" else (
        {"class_label": 3} if served.conditioning == "class" else {})


def _over_http(url: str, request: dict) -> float:
    """Seconds for one generation over the JSON API (POST, then the event stream to its end)."""
    began = time.perf_counter()
    post = urllib.request.Request(f"{url}gradio_api/call/generate", data=json.dumps({"data": [request]}).encode(),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=600) as response:
        event = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/generate/{event}", timeout=600) as response:
        body = response.read().decode()
    if "event: complete" not in body:
        raise RuntimeError(body[:500])
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", action="append", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    served = load_served(args.pipeline)
    out = Path(tempfile.mkdtemp(prefix="difflab-serve-bench-"))
    rows = []
    app, url = start(args.pipeline, port=_free_port(), out_dir=out / "http", block=False, quiet=True)
    try:
        for name, s in served.items():
            for n in (1, 4):
                raw = {"pipeline": name, "n": n, **_condition(s)}
                req = parse_request(raw, served, out)
                generate(s, req, out)  # warm-up (text encoder, allocator)
                firsts, totals, https = [], [], []
                for k in range(args.repeats):
                    req = parse_request({**raw, "seed": 100 + k}, served, out)
                    run = generate(s, req, out, on_preview=lambda *_: None)
                    firsts.append(run.first_preview_seconds)
                    totals.append(run.seconds)
                    https.append(_over_http(url, {**raw, "seed": 200 + k}))
                no_preview = [generate(s, parse_request({**raw, "seed": 300 + k}, served, out), out).seconds
                              for k in range(args.repeats)]
                rows.append({"pipeline": name, "image": "x".join(map(str, s.image_size)), "n": n,
                             "sampler": s.pipeline.sampler, "steps": s.pipeline.steps,
                             "guidance": s.default_guidance[0],
                             "first_preview_s": statistics.median(firsts),
                             "seconds_with_previews": statistics.median(totals),
                             "seconds_per_image": statistics.median(totals) / n,
                             "seconds_without_previews": statistics.median(no_preview),
                             "seconds_over_http": statistics.median(https)})
                print(rows[-1], flush=True)
    finally:
        app.close()
    RESULTS.mkdir(exist_ok=True)
    meta = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__}
    (RESULTS / "serve_timings.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"`difflab serve` timings on this CPU ({args.threads} thread(s), median of {args.repeats}; the "
             "pipelines' default sampler, steps and guidance)", "",
             "| pipeline | image | n | sampler | steps | guidance | first preview s | s with previews | s per image "
             "| s without previews | s over the JSON API |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pipeline']} | {r['image']} | {r['n']} | {r['sampler']} | {r['steps']} | {r['guidance']} "
                     f"| {r['first_preview_s']:.3f} | {r['seconds_with_previews']:.3f} | {r['seconds_per_image']:.3f} "
                     f"| {r['seconds_without_previews']:.3f} | {r['seconds_over_http']:.3f} |")
    (RESULTS / "serve_timings.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
