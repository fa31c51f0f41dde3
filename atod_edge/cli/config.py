"""`atod-edge config show [RECIPE] [--stage train|sft|eval] [--set ...] [--keys]`: the config a
recipe resolves to (atod_edge.config.load_config), or every key of a stage's config with its help."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("config", help="show resolved configs")
    c_sub = p.add_subparsers(dest="config_command", metavar="ACTION")
    # `atod-edge config` alone is `config show`, as `env` and `models` alone list
    p.set_defaults(recipe=None, stage="train", overrides=[], keys=False)
    show = c_sub.add_parser("show", help="print the resolved config of a recipe")
    show.add_argument("recipe", nargs="?", default=None)
    show.add_argument("--stage", choices=["train", "sft", "eval"], default="train")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.add_argument("--keys", action="store_true", help="list every key with its help text")


def run(args: argparse.Namespace) -> int:
    from atod_edge.config import describe, dump_yaml, load_config

    if args.stage == "train":
        from atod_edge.train.config import TrainConfig as cls
    elif args.stage == "sft":
        from atod_edge.train.config import SFTConfig as cls
    else:
        from atod_edge.evaluate.evaluate import EvalConfig as cls
    if args.keys:
        for key, default, help_text in describe(cls):
            print(f"{key:32s} {default:16s} {help_text}")
        return 0
    print(dump_yaml(load_config(cls, args.recipe, args.overrides)), end="")
    return 0
