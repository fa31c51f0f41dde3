"""Arguments shared by the commands that resolve a recipe into a config (train, sft, eval):
the optional recipe and repeatable `--set KEY=VALUE` overrides, read by atod_edge.config.load_config."""

from __future__ import annotations

import argparse


def add_recipe_args(p: argparse.ArgumentParser, recipe_help: str) -> None:
    p.add_argument("recipe", nargs="?", default=None, help=recipe_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key), repeatable")


def shortcut_overrides(args: argparse.Namespace, keys: tuple[str, ...]) -> list[str]:
    """args.overrides followed by `key=value` for each shortcut option in `keys` that was given."""
    overrides = list(args.overrides)
    for key in keys:
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides
