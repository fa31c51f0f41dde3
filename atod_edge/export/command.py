"""`atod-edge export CKPT --onnx [--int8] --gguf [--quant ...] --out DIR` and
`atod-edge export verify DIR`: thin CLI glue over export_model / verify_dir.

Verification settings come from VerifyConfig: `--set verify.KEY=VALUE` (repeatable; `atod-edge export
keys` lists them), with `--env` and `--episodes` as shortcuts for verify.env and verify.n_episodes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from atod_edge.config import nested
from atod_edge.errors import UserError

from .verify import VerifyConfig


@dataclass
class ExportSettings:
    """The `--set` namespace of `atod-edge export` (keys are verify.*)."""

    verify: VerifyConfig = nested(VerifyConfig, "export verification")


def verify_config(overrides: list[str], env: str | None = None, episodes: int | None = None) -> VerifyConfig:
    """VerifyConfig from `verify.KEY=VALUE` overrides and the --env / --episodes shortcuts."""
    from atod_edge.config import load_config

    items = list(overrides or [])
    for item in items:
        if not item.split("=", 1)[0].strip().startswith("verify."):
            raise UserError(f"--set '{item}': export settings are verify.KEY=VALUE "
                            "(`atod-edge export keys` lists them)")
    if env is not None:
        items.append(f"verify.env={env}")
    if episodes is not None:
        items.append(f"verify.n_episodes={episodes}")
    return load_config(ExportSettings, None, items).verify


def export_command(args) -> int:
    from atod_edge.export import DEFAULT_QUANTS, exit_code, export_model, verify_dir
    from atod_edge.export.report import render_markdown

    if args.checkpoint == "keys":
        from atod_edge.config import describe

        for key, default, help_text in describe(ExportSettings):
            print(f"{key:28s} {default:10s} {help_text}")
        return 0
    config = verify_config(getattr(args, "overrides", []), getattr(args, "env", None), args.episodes)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.checkpoint == "verify":
        if not args.verify_dir:
            raise UserError("usage: atod-edge export verify DIR")
        report = verify_dir(args.verify_dir, config=config, progress=say)
    else:
        if args.verify_dir:
            raise UserError(f"unexpected argument '{args.verify_dir}' (did you mean `export verify DIR`?)")
        quants = args.quant.split(",") if args.quant else list(DEFAULT_QUANTS)
        if not args.onnx and not args.gguf and not args.int8:
            raise UserError("nothing to export: ask for --onnx, --int8 and/or --gguf")
        out = args.out or f"{Path(args.checkpoint).name}-export"
        report = export_model(args.checkpoint, out, onnx=args.onnx or args.int8, int8=args.int8,
                              gguf_quants=quants if args.gguf or args.quant else [],
                              verify=not args.no_verify, config=config, progress=say,
                              calibrate=getattr(args, "calibrate", None) or 0)
    print(render_markdown(report))
    return exit_code(report) if report.get("verified", True) else 0
