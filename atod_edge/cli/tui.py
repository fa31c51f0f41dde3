"""`atod-edge tui`: the terminal app (live runs, episode inspector, training dashboard, diff view).

Arguments only: tui.app.run_tui picks the screen from what PATH is.
"""

from __future__ import annotations

import argparse

from atod_edge.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("tui", help="terminal app: live runs, episode inspector, training dashboard")
    p.add_argument("path", nargs="?", help="run dir, episodes .jsonl, or model (dir/.onnx/.gguf)")
    p.add_argument("--env", default=None, help="environment for live runs")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir for decoding tokens")
    p.add_argument("--split", default="eval", choices=["train", "valid", "eval", "unseen"], help="task split for live runs")
    p.add_argument("--index", type=int, default=0, help="task index for live runs")
    p.add_argument("--theme", default="dark", choices=["dark", "light"])
    p.add_argument("--diff", nargs=2, metavar=("A.jsonl", "B.jsonl"),
                   help="two agents' episodes on the same tasks side by side (from eval --model A --model B)")


def run(args: argparse.Namespace) -> int:
    try:
        from atod_edge.tui.app import run_tui
    except ImportError as e:
        raise UserError(f"the TUI needs textual: pip install 'atod-edge[tui]' ({e})") from None
    if args.diff and args.path:
        raise UserError("--diff takes the two episode files itself: give no PATH with it")
    return run_tui(args.path, env=args.env, tokenizer=args.tokenizer, split=args.split, index=args.index,
                   theme=args.theme, diff=args.diff)
