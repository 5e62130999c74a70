"""Command line: ``difflab info | demo | train``."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    from difflab import predictions, processes, samplers, schedules

    print("processes:")
    for name in processes.available():
        print(f"  {name:16s} {processes.REFERENCES[name]}")
    print("predictions:")
    for name in predictions.available():
        print(f"  {name:16s} {predictions.PREDICTIONS[name].reference}")
    print("samplers:")
    for name in samplers.available():
        info = samplers.get(name)
        opts = ", ".join(f"{k}={v!r}" for k, v in info.options.items())
        print(f"  {name:16s} {info.reference}" + (f"  [{opts}]" if opts else ""))
    print("schedules:")
    for name in schedules.available():
        print(f"  {name:16s} {schedules.reference(name)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from difflab import demo

    if args.kind == "digits":
        metrics = demo.run_digits(args.out, overrides=args.set, steps=args.steps, progress=not args.no_progress)
        print(json.dumps(metrics, indent=1))
        print(f"wrote {args.out}/samples.png and {args.out}/metrics.json")
        return 0
    metrics = demo.run_analytic(args.out, n=args.n, steps=args.steps, seed=args.seed)
    print(json.dumps({k: v for k, v in metrics.items() if k != "results"}, indent=1))
    for key, row in metrics["results"].items():
        print(f"{key:36s} NFE {row['nfe']:3d}  RMSE to exact ODE {row['rmse_to_exact_ode']:.2e}  "
              f"SW to data {row['sliced_wasserstein_to_data']:.3f}")
    print(f"wrote {args.out}/samples.png and {args.out}/metrics.json")
    return 0


def _train(args: argparse.Namespace) -> int:
    from difflab.training import config as train_config
    from difflab.training.trainer import Trainer

    cfg = train_config.load(args.config, args.set)
    trainer = Trainer(cfg)
    last = trainer.run(resume=args.resume, progress=not args.no_progress)
    if trainer.rank == 0:
        grid = trainer.sample_grid(trainer.out / "samples" / "final.png")
        print(json.dumps(last))
        print(f"wrote {trainer.out}/final (EMA weights), {grid} and {trainer.out}/metrics.jsonl")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflab", description="Diffusion and flow-matching toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="list processes, predictions, samplers and schedules with references")
    p.set_defaults(func=_info)
    p = sub.add_parser("demo", help="digits: train, sample and score a class-conditional model; "
                                     "analytic: sample the exact 2-D mixture and measure the error")
    p.add_argument("kind", nargs="?", choices=("digits", "analytic"), default="digits")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the recipe")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    p = sub.add_parser("train", help="train a model from a TOML recipe (configs/*.toml)")
    p.add_argument("config", nargs="?", help="TOML recipe; defaults apply to what it leaves out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=200 --set optim.lr=1e-3")
    p.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in out_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
