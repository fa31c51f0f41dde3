"""`atod-edge` command line: the top of the house. It builds the parser from one module per command
(cli/train.py, sft.py, eval.py, export.py, tui.py, env.py, models.py, config.py, each with
`add_parser(subparsers)` and `run(args) -> int`), sets up logging, and turns a UserError into one
line on stderr and its exit code. The commands import their stages (train, export, tui, ...) lazily
inside `run`, so `atod-edge --help` stays fast and a stage's optional extras are needed only by it."""

from __future__ import annotations

import argparse
import logging
import sys

from atod_edge import __version__
from atod_edge.cli import config, env, export, models, sft, train, tui
from atod_edge.cli import eval as eval_  # the module `eval`, not the builtin
from atod_edge.errors import UserError

# command name -> its module, in the order `atod-edge --help` lists them
COMMANDS = {"train": train, "sft": sft, "eval": eval_, "export": export, "tui": tui, "env": env,
            "models": models, "config": config}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atod-edge",
        description="Distil an LM agent into a compact edge agent with ATOD, export it, inspect it.")
    parser.add_argument("--version", action="version", version=f"atod-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 0
    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except UserError as e:
        print(f"atod-edge {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:   # a full disk (or file size limit) where no stage caught it: still one line
        from atod_edge.io import disk_full_error

        full = disk_full_error(e, getattr(e, "filename", None))
        if full is None:
            raise
        print(f"atod-edge {args.command}: error: {full}", file=sys.stderr)
        return full.exit_code
    except KeyboardInterrupt:
        print(f"\natod-edge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
