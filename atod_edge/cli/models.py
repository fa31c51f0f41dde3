"""`atod-edge models list|info|shrink|average|publish`: the presets and zoo models, what a checkpoint
is, layer surgery (models.surgery), and adding a trained checkpoint to the zoo (evaluate.publish)."""

from __future__ import annotations

import argparse
from pathlib import Path

from atod_edge.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list, inspect, shrink and average models")
    m_sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    m_sub.add_parser("list", help="list presets and zoo models (with their measured success)")
    info = m_sub.add_parser("info", help="describe a model")
    info.add_argument("model")
    shrink = m_sub.add_parser("shrink", help="cut a compact student by keeping a subset of layers")
    shrink.add_argument("model")
    shrink.add_argument("--keep-layers", required=True, help='e.g. "0,2,4" or "every:3"')
    shrink.add_argument("--out", required=True, help="a new directory, or an earlier model (replaced)")
    shrink.add_argument("--force", action="store_true", help=FORCE_HELP)
    average = m_sub.add_parser("average", help="average the weights of checkpoints of one architecture")
    average.add_argument("models", nargs="+", metavar="MODEL")
    average.add_argument("--out", required=True, help="a new directory, or an earlier model (replaced)")
    average.add_argument("--force", action="store_true", help=FORCE_HELP)
    publish = m_sub.add_parser("publish", help="add a trained checkpoint to the model zoo (fp16 copy, "
                                               "evaluated on the eval and unseen splits, with its card)")
    publish.add_argument("model", help="checkpoint dir (with --adapter: a LoRA checkpoint holding adapter/)")
    publish.add_argument("--name", required=True, help="zoo name, e.g. household-teacher")
    publish.add_argument("--chain", required=True, metavar="FILE",
                         help="text file: the exact commands that made the checkpoint, one per line")
    publish.add_argument("--env", default="household")
    publish.add_argument("--episodes", type=int, default=300, help="episodes per split (default 300)")
    publish.add_argument("--description", default="")
    publish.add_argument("--trained-on", default="", help="where it was trained (default: this CPU)")
    publish.add_argument("--zoo", default=None, help="zoo directory (default: the package's atod_edge/zoo)")
    publish.add_argument("--force", action="store_true",
                         help="let the zoo entry replace a non-empty directory that is not a model")
    publish.add_argument("--adapter", action="store_true",
                         help="store the LoRA adapter only (needs --base); loading merges it into the base")
    publish.add_argument("--base", default=None, metavar="PRESET",
                         help="with --adapter: the preset it was trained on, e.g. smollm2-135m")
    publish.add_argument("--dtype", "--adapter-dtype", dest="dtype", default=None,
                         choices=("float32", "float16", "bfloat16"),
                         help="storage dtype of the weights (default: float16 for a full model; with --adapter: "
                              "the adapter as saved)")
    publish.add_argument("--save-episodes", metavar="DIR", default=None,
                         help="also keep the evaluation's episodes and reports in DIR/eval and DIR/unseen")
    publish.add_argument("--eval-precision", default="fp32", choices=("fp32", "bf16"),
                         help="weights the card's evaluation decodes with (bf16: ~2x faster on CPUs with native "
                              "bf16; the card says so)")


FORCE_HELP = "let --out replace a non-empty directory that is not an earlier model (its files are lost)"


def run(args: argparse.Namespace) -> int:
    action = args.models_command or "list"
    return {"list": _list, "info": _info, "shrink": _shrink, "average": _average,
            "publish": _publish}[action](args)


def _list(args: argparse.Namespace) -> int:
    from atod_edge.models.describe import list_models

    for row in list_models():
        print("  ".join(f"{v}" for v in row.values()))
    return 0


def _info(args: argparse.Namespace) -> int:
    from atod_edge.models import zoo
    from atod_edge.models.describe import model_info
    from atod_edge.models.loading import load_model

    load_model(args.model, device="meta")   # refuse damaged weights before describing them
    for key, value in model_info(args.model).items():
        print(f"{key:18s} {value}")
    if zoo.is_zoo_name(args.model):
        print()
        print((zoo.model_dir(args.model) / zoo.CARD_MD).read_text(encoding="utf-8"), end="")
    return 0


def _shrink(args: argparse.Namespace) -> int:
    from atod_edge.io import check_output

    check_output(args.out, "model", force=args.force)   # at once, before torch is imported
    from transformers import AutoConfig

    from atod_edge.models.presets import resolve_model
    from atod_edge.models.surgery import parse_keep_layers, shrink_model

    src = resolve_model(args.model)
    n_layers = AutoConfig.from_pretrained(src).num_hidden_layers
    keep = parse_keep_layers(args.keep_layers, n_layers)
    shrink_model(src, keep, args.out, force=args.force)
    print(f"kept layers {keep} of {n_layers}: {args.out}")
    return 0


def _average(args: argparse.Namespace) -> int:
    from atod_edge.io import check_output

    check_output(args.out, "model", force=args.force)   # at once, before torch is imported
    from atod_edge.models.surgery import average_models

    average_models(args.models, args.out, force=args.force)
    print(f"averaged {len(args.models)} models: {args.out}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from atod_edge.evaluate.publish import publish
    from atod_edge.models import zoo

    try:
        chain = [line.rstrip() for line in Path(args.chain).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--chain {args.chain}: cannot read it ({type(e).__name__})") from None
    if not any(line.strip() for line in chain):
        raise UserError(f"--chain {args.chain} is empty: give the commands that made the model")
    if args.adapter != bool(args.base):
        raise UserError("--adapter and --base go together: --adapter --base PRESET publishes a LoRA adapter "
                        "over that preset")
    root = Path(args.zoo) if args.zoo else zoo.ZOO_ROOT
    out = publish(args.model, args.name, chain, env=args.env, episodes=args.episodes,
                  description=args.description, trained_on=args.trained_on, root=root, force=args.force,
                  base=args.base, dtype=args.dtype, precision=args.eval_precision,
                  episodes_out=Path(args.save_episodes) if args.save_episodes else None)
    print(f"{args.name}: {zoo.summary_line(zoo.read_card(args.name, root))}")
    print(f"zoo entry written: {out}/ (card: {out / zoo.CARD_MD})")
    return 0
