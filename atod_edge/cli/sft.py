"""`atod-edge sft`: supervised fine-tuning on demonstrations (the teacher bootstrap, a cold start).

Arguments only: the shortcut options become config overrides for train.sft.sft_command.
"""

from __future__ import annotations

import argparse

from atod_edge.cli.options import add_recipe_args, shortcut_overrides
from atod_edge.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sft", help="supervised fine-tuning on demonstrations (teacher bootstrap, "
                                          "cold start)")
    add_recipe_args(p, "recipe YAML (optional)")
    p.add_argument("--env", help="environment (shortcut for --set env=...)")
    p.add_argument("--model", help="preset name or checkpoint dir to start from")
    p.add_argument("--demos", help="expert | noisy | dart | dagger | a mix (dart+dagger) | FILE.jsonl")
    p.add_argument("--episodes", type=int, help="number of demonstration episodes")
    p.add_argument("--out", help="output model dir (metrics, checkpoints, curves go to OUT.work/)")
    p.add_argument("--resume", metavar="OUT", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--force", action="store_true",
                   help="let --out replace a non-empty directory that is not an earlier model (its files are lost)")


def run(args: argparse.Namespace) -> int:
    from atod_edge.io import check_output

    if args.resume and args.out:
        raise UserError("--resume continues the run where it was: give --resume OUT without --out")
    if args.out:
        check_output(args.out, "model", force=args.force)   # at once, before torch is imported
    from atod_edge.train.sft import sft_command

    overrides = shortcut_overrides(args, ("env", "model", "demos", "episodes", "out"))
    return sft_command(args.recipe, overrides, resume=args.resume, force=args.force)
