"""`atod-edge export CKPT --onnx [--int8] --gguf [--quant ...] --out DIR` and
`atod-edge export verify DIR`: thin CLI glue over export_model / verify_dir."""

from __future__ import annotations

import sys
from pathlib import Path

from atod_edge.errors import UserError


def export_command(args) -> int:
    from atod_edge.export import DEFAULT_QUANTS, VerifyConfig, exit_code, export_model, verify_dir
    from atod_edge.export.report import render_markdown

    config = VerifyConfig()
    if args.episodes is not None:
        config.n_episodes = args.episodes

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
                              verify=not args.no_verify, config=config, progress=say)
    print(render_markdown(report))
    return exit_code(report) if report.get("verified", True) else 0
