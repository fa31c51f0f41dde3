"""`atod-edge export`: export a checkpoint to ONNX / GGUF, quantize and verify the files.

Its positional argument is one of three things, dispatched first thing in `run`:

    atod-edge export CHECKPOINT --onnx [--int8] --gguf [--quant ...] [--out DIR]   export (and verify)
    atod-edge export verify DIR                                                    re-verify an export dir
    atod-edge export keys                                                          list the verify.* settings

Verification settings are export.verify.VerifyConfig, set with `--set verify.KEY=VALUE` (`--env` and
`--episodes` are shortcuts; export.command.verify_config resolves them); export.pipeline writes and
verifies the files, export.report renders its report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atod_edge.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a checkpoint to ONNX / GGUF, quantize and verify")
    p.add_argument("checkpoint", help="checkpoint dir, or `verify` followed by an export dir, "
                   "or `keys` (list the verify.* settings)")
    p.add_argument("verify_dir", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--onnx", action="store_true", help="export ONNX (fp32)")
    p.add_argument("--int8", action="store_true", help="also write a dynamic int8 ONNX")
    p.add_argument("--gguf", action="store_true", help="export GGUF")
    p.add_argument("--quant", default=None, help="GGUF quant types, comma separated (default f16,q8_0,q4_k_m)")
    p.add_argument("--out", help="output dir: new, or an earlier export (replaced once the new one is complete; "
                                 "default CHECKPOINT-export)")
    p.add_argument("--force", action="store_true",
                   help="let --out replace a non-empty directory that is not an earlier export")
    p.add_argument("--episodes", type=int, default=None, help="episodes for agent parity")
    p.add_argument("--env", default=None,
                   help="env to verify on (default: the checkpoint's run config.yaml or zoo card, else household)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="verify.KEY=VALUE",
                   help="override a verification setting, repeatable (`atod-edge export keys` lists them)")
    p.add_argument("--calibrate", type=int, nargs="?", const=16, default=None, metavar="EPISODES",
                   help="quantize the GGUF K-quants with an importance matrix from the student's own "
                        "train-split episodes (default 16)")
    p.add_argument("--no-verify", action="store_true", help="skip verification")


def run(args: argparse.Namespace) -> int:
    try:
        from atod_edge.export import exit_code
        from atod_edge.export.command import verify_config
        from atod_edge.export.report import render_markdown
    except ImportError as e:
        raise UserError(f"export needs the export extra: pip install 'atod-edge[export]' ({e})") from None

    if args.checkpoint == "keys":
        return _list_keys()
    config = verify_config(args.overrides, args.env, args.episodes)
    if args.checkpoint == "verify":
        report = _verify(args, config)
    else:
        report = _export(args, config)
    print(render_markdown(report))
    return exit_code(report) if report.get("verified", True) else 0


def _list_keys() -> int:
    """`atod-edge export keys`: every verify.* setting with its default and help text."""
    from atod_edge.config import describe
    from atod_edge.export.command import ExportSettings

    for key, default, help_text in describe(ExportSettings):
        print(f"{key:28s} {default:10s} {help_text}")
    return 0


def _verify(args: argparse.Namespace, config) -> dict:
    """`atod-edge export verify DIR`: check the files of an earlier export again."""
    from atod_edge.export import verify_dir

    if not args.verify_dir:
        raise UserError("usage: atod-edge export verify DIR")
    return verify_dir(args.verify_dir, config=config, progress=_say)


def _export(args: argparse.Namespace, config) -> dict:
    """`atod-edge export CHECKPOINT ...`: write the asked-for files, verified unless --no-verify."""
    from atod_edge.export import DEFAULT_QUANTS, export_model

    if args.verify_dir:
        raise UserError(f"unexpected argument '{args.verify_dir}' (did you mean `export verify DIR`?)")
    quants = args.quant.split(",") if args.quant else list(DEFAULT_QUANTS)
    if not args.onnx and not args.gguf and not args.int8:
        raise UserError("nothing to export: ask for --onnx, --int8 and/or --gguf")
    out = args.out or f"{Path(args.checkpoint).name}-export"
    return export_model(args.checkpoint, out, onnx=args.onnx or args.int8, int8=args.int8,
                        gguf_quants=quants if args.gguf or args.quant else [],
                        verify=not args.no_verify, config=config, progress=_say,
                        calibrate=args.calibrate or 0, force=args.force)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
