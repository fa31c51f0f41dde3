"""`atod-edge train`: train a student with ATOD (or the OPD / GRPO baselines).

Arguments only: the recipe and its overrides go to train.pipeline.train_command, which bootstraps
the models, runs the trainer and writes the run directory (metrics, checkpoints, report.json).
"""

from __future__ import annotations

import argparse

from atod_edge.cli.options import add_recipe_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a student with ATOD (or OPD / GRPO baselines)")
    add_recipe_args(p, "recipe YAML or built-in recipe name (default: the household default)")
    p.add_argument("--algo", choices=["atod", "opd", "grpo"], help="shortcut for --set algo=...")
    p.add_argument("--teacher", help="shortcut for --set teacher=...: checkpoint dir, preset, zoo name, or a "
                                     ".gguf file scored by llama.cpp")
    p.add_argument("--out", help="run directory (default: runs/<recipe>-<algo>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")


def run(args: argparse.Namespace) -> int:
    from atod_edge.io import check_output

    if args.out and not args.resume:
        check_output(args.out, "run")   # at once, before torch is imported (train_command checks it too)
    from atod_edge.train.pipeline import train_command

    overrides = list(args.overrides)
    if args.algo:
        overrides.append(f"algo={args.algo}")
    if args.teacher:
        overrides.append(f"teacher={args.teacher}")
    return train_command(args.recipe, overrides, out=args.out, resume=args.resume)
