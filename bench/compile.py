"""torch.compile on the trained pipelines (issue #17): compile time, steady speed against eager,
and how far the images move, one thread.

For each pipeline: the eager run (warmed up), then ``Pipeline.compile()`` (inductor) and the first
compiled call (compile time = its wall time minus an eager call's), then eager and compiled calls
interleaved (median of rounds) on the same seeds and settings, and the largest pixel difference.

Run by hand, alone:  python bench/compile.py --pipeline runs/digits/final --pipeline runs/shapes_t2i/final
Writes bench/results/compile.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from difflab.data.shapes import all_captions
from difflab.pipeline import Pipeline

RESULTS = Path(__file__).parent / "results"


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(folder: str, n: int, rounds: int) -> dict:
    """One pipeline's row: compile time, eager and compiled time per image, the largest difference."""
    eager = Pipeline.from_pretrained(folder)
    kw: dict = {}
    if eager.text_encoder_config:
        kw["prompts"] = all_captions()[:n]
    elif eager.num_classes:
        kw["class_labels"] = [i % eager.num_classes for i in range(n)]

    def call(pipe: Pipeline) -> torch.Tensor:
        return pipe(n, seed=0, batch_size=n, **kw).images

    reference, _ = _timed(lambda: call(eager))
    _, eager_once = _timed(lambda: call(eager))
    compiled = copy.deepcopy(eager).compile()
    torch._dynamo.reset()
    images, first = _timed(lambda: call(compiled))
    t_eager, t_compiled = [], []
    for _ in range(rounds):
        t_eager.append(_timed(lambda: call(eager))[1])
        t_compiled.append(_timed(lambda: call(compiled))[1])
    row = {"pipeline": folder, "images": n, "steps": eager.steps, "sampler": eager.sampler,
           "guidance": eager.guidance.get("method"), "compile_seconds": first - eager_once,
           "eager_ms_per_image": 1e3 * statistics.median(t_eager) / n,
           "compiled_ms_per_image": 1e3 * statistics.median(t_compiled) / n,
           "max_pixel_difference": float((images - reference).abs().max())}
    row["speedup"] = row["eager_ms_per_image"] / row["compiled_ms_per_image"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", action="append", required=True)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for folder in args.pipeline:
        rows.append(measure(folder, args.n, args.rounds))
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"threads": 1, "rounds": args.rounds, "backend": "inductor", "torch": torch.__version__}
    (RESULTS / "compile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"torch.compile (inductor, `Pipeline.compile()`) on the trained pipelines: {args.n} images per call "
             f"at the pipeline's default sampling, 1 thread, median of {args.rounds} interleaved calls", "",
             "| pipeline | sampling | compile s | eager ms / image | compiled ms / image | speed-up "
             "| max pixel difference |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['pipeline']} | {r['sampler']} {r['steps']} steps, guidance {r['guidance']} | "
              f"{r['compile_seconds']:.1f} | {r['eager_ms_per_image']:.1f} | {r['compiled_ms_per_image']:.1f} | "
              f"{r['speedup']:.2f}x | {r['max_pixel_difference']:.1e} |" for r in rows]
    (RESULTS / "compile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
