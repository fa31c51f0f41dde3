"""`atod-edge` command line. Stages (train, export, tui) are imported lazily inside their
subcommands, so `atod-edge --help` stays fast and the core never imports a stage at import time."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from atod_edge import __version__
from atod_edge.errors import UserError


def _add_config_args(p: argparse.ArgumentParser, recipe_help: str) -> None:
    p.add_argument("recipe", nargs="?", default=None, help=recipe_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key), repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atod-edge",
        description="Distil an LM agent into a compact edge agent with ATOD, export it, inspect it.")
    parser.add_argument("--version", action="version", version=f"atod-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a student with ATOD (or OPD / GRPO baselines)")
    _add_config_args(p, "recipe YAML or built-in recipe name (default: the household default)")
    p.add_argument("--algo", choices=["atod", "opd", "grpo"], help="shortcut for --set algo=...")
    p.add_argument("--teacher", help="shortcut for --set teacher=...: checkpoint dir, preset, zoo name, or a "
                                     ".gguf file scored by llama.cpp")
    p.add_argument("--out", help="run directory (default: runs/<recipe>-<algo>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")

    p = sub.add_parser("sft", help="supervised fine-tuning on demonstrations (teacher bootstrap, cold start)")
    _add_config_args(p, "recipe YAML (optional)")
    p.add_argument("--env", help="environment (shortcut for --set env=...)")
    p.add_argument("--model", help="preset name or checkpoint dir to start from")
    p.add_argument("--demos", help="expert | noisy | dart | dagger | a mix (dart+dagger) | FILE.jsonl")
    p.add_argument("--episodes", type=int, help="number of demonstration episodes")
    p.add_argument("--out", help="output model dir (metrics, checkpoints, curves go to OUT.work/)")
    p.add_argument("--resume", metavar="OUT", help="continue an interrupted run from its last checkpoint")

    p = sub.add_parser("eval", help="evaluate a policy on an environment split")
    _add_config_args(p, "recipe YAML (optional)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--model", action="append",
                     help="checkpoint dir, preset, .onnx file/dir or .gguf file; twice (--model A --model B) "
                          "compares A and B on the same seeded tasks")
    who.add_argument("--policy", choices=["expert", "random"], help="a scripted policy")
    p.add_argument("--compare", metavar="AGENT",
                   help="a second agent (model, or expert/random) played on the same seeded tasks: writes "
                        "OUT/a/, OUT/b/ and the pairing index OUT/pairs.json, for `atod-edge tui --diff`")
    p.add_argument("--env", help="environment name or pkg.module:Class")
    p.add_argument("--split", choices=["train", "eval", "unseen"])
    p.add_argument("--episodes", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--device", help="torch device (cpu, cuda)")
    p.add_argument("--out", help="directory for report.json and episodes.jsonl")

    p = sub.add_parser("export", help="export a checkpoint to ONNX / GGUF, quantize and verify")
    p.add_argument("checkpoint", help="checkpoint dir, or `verify` followed by an export dir, "
                   "or `keys` (list the verify.* settings)")
    p.add_argument("verify_dir", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--onnx", action="store_true", help="export ONNX (fp32)")
    p.add_argument("--int8", action="store_true", help="also write a dynamic int8 ONNX")
    p.add_argument("--gguf", action="store_true", help="export GGUF")
    p.add_argument("--quant", default=None, help="GGUF quant types, comma separated (default f16,q8_0,q4_k_m)")
    p.add_argument("--out", help="output dir (default CHECKPOINT-export)")
    p.add_argument("--episodes", type=int, default=None, help="episodes for agent parity")
    p.add_argument("--env", default=None,
                   help="env to verify on (default: the checkpoint's run config.yaml or zoo card, else household)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="verify.KEY=VALUE",
                   help="override a verification setting, repeatable (`atod-edge export keys` lists them)")
    p.add_argument("--calibrate", type=int, nargs="?", const=16, default=None, metavar="EPISODES",
                   help="quantize the GGUF K-quants with an importance matrix from the student's own "
                        "train-split episodes (default 16)")
    p.add_argument("--no-verify", action="store_true", help="skip verification")

    p = sub.add_parser("tui", help="terminal app: live runs, episode inspector, training dashboard")
    p.add_argument("path", nargs="?", help="run dir, episodes .jsonl, or model (dir/.onnx/.gguf)")
    p.add_argument("--env", default=None, help="environment for live runs")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir for decoding tokens")
    p.add_argument("--split", default="eval", choices=["train", "eval", "unseen"], help="task split for live runs")
    p.add_argument("--index", type=int, default=0, help="task index for live runs")
    p.add_argument("--theme", default="dark", choices=["dark", "light"])
    p.add_argument("--diff", nargs=2, metavar=("A.jsonl", "B.jsonl"),
                   help="two agents' episodes on the same tasks side by side (from eval --model A --model B)")

    p = sub.add_parser("env", help="list environments, play one yourself")
    env_sub = p.add_subparsers(dest="env_command", metavar="ACTION")
    env_sub.add_parser("list", help="list environments")
    play = env_sub.add_parser("play", help="play an environment in the terminal")
    play.add_argument("env")
    play.add_argument("--seed", type=int, default=0, help="task index")
    play.add_argument("--split", default="eval", choices=["train", "eval", "unseen"])

    p = sub.add_parser("models", help="list, inspect, shrink and average models")
    m_sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    m_sub.add_parser("list", help="list presets and zoo models (with their measured success)")
    info = m_sub.add_parser("info", help="describe a model")
    info.add_argument("model")
    shrink = m_sub.add_parser("shrink", help="cut a compact student by keeping a subset of layers")
    shrink.add_argument("model")
    shrink.add_argument("--keep-layers", required=True, help='e.g. "0,2,4" or "every:3"')
    shrink.add_argument("--out", required=True)
    average = m_sub.add_parser("average", help="average the weights of checkpoints of one architecture")
    average.add_argument("models", nargs="+", metavar="MODEL")
    average.add_argument("--out", required=True)
    publish = m_sub.add_parser("publish", help="add a trained checkpoint to the model zoo (fp16 copy, "
                                               "evaluated on the eval and unseen splits, with its card)")
    publish.add_argument("model", help="checkpoint dir")
    publish.add_argument("--name", required=True, help="zoo name, e.g. household-teacher")
    publish.add_argument("--chain", required=True, metavar="FILE",
                         help="text file: the exact commands that made the checkpoint, one per line")
    publish.add_argument("--env", default="household")
    publish.add_argument("--episodes", type=int, default=300, help="episodes per split (default 300)")
    publish.add_argument("--description", default="")
    publish.add_argument("--trained-on", default="", help="where it was trained (default: this CPU)")
    publish.add_argument("--zoo", default=None, help="zoo directory (default: the package's atod_edge/zoo)")

    p = sub.add_parser("config", help="show resolved configs")
    c_sub = p.add_subparsers(dest="config_command", metavar="ACTION")
    show = c_sub.add_parser("show", help="print the resolved config of a recipe")
    show.add_argument("recipe", nargs="?", default=None)
    show.add_argument("--stage", choices=["train", "sft", "eval"], default="train")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.add_argument("--keys", action="store_true", help="list every key with its help text")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 0
    handler = COMMANDS[args.command]
    try:
        return int(handler(args) or 0)
    except UserError as e:
        print(f"atod-edge {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\natod-edge {args.command}: interrupted", file=sys.stderr)
        return 130


# --- subcommands -----------------------------------------------------------------------------

def cmd_train(args) -> int:
    from atod_edge.train.pipeline import train_command

    overrides = list(args.overrides)
    if args.algo:
        overrides.append(f"algo={args.algo}")
    if args.teacher:
        overrides.append(f"teacher={args.teacher}")
    return train_command(args.recipe, overrides, out=args.out, resume=args.resume)


def cmd_sft(args) -> int:
    from atod_edge.train.sft import sft_command

    overrides = list(args.overrides)
    if args.resume and args.out:
        raise UserError("--resume continues the run where it was: give --resume OUT without --out")
    for key in ("env", "model", "demos", "episodes", "out"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    return sft_command(args.recipe, overrides, resume=args.resume)


def cmd_eval(args) -> int:
    from atod_edge.config import load_config
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate, format_summary, save_eval

    overrides = list(args.overrides)
    for key in ("env", "split", "episodes", "temperature", "device"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(EvalConfig, args.recipe, overrides)
    agents = [*(args.model or []), *([args.policy] if args.policy else []), *([args.compare] if args.compare else [])]
    if len(agents) > 2:
        raise UserError(f"a comparison takes two agents, got {len(agents)}: {', '.join(agents)}")
    if len(agents) == 2:
        return _eval_compare(cfg, agents, args.out)
    if args.policy:
        policy = args.policy
    else:
        if not args.model:
            raise UserError("give --model PATH or --policy expert|random")
        from atod_edge.engine.backends import load_policy

        policy = load_policy(args.model[0], device=cfg.device)   # --model appends: one here
    progress = _progress_printer("eval", "episodes")
    summary, episodes = evaluate(policy, cfg, progress=progress)
    out = args.out or f"runs/eval-{cfg.env.replace(':', '_').replace('.', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    save_eval(out, summary, episodes)
    print(format_summary(summary))
    print(f"report and episodes: {out}/")
    return 0


def _eval_compare(cfg, agents: list[str], out: str | None) -> int:
    """Evaluate two agents with one config (same tasks, same sampling seeds) and pair them."""
    from pathlib import Path

    from atod_edge.evaluate.evaluate import compare_summary, evaluate, format_comparison, format_summary, save_comparison

    runs = []
    for label, spec in zip("ab", agents):
        if spec in ("expert", "random") and not Path(spec).exists():
            policy = spec
        else:
            from atod_edge.engine.backends import load_policy

            policy = load_policy(spec, device=cfg.device)
        summary, episodes = evaluate(policy, cfg, progress=_progress_printer(f"eval {label.upper()}", "episodes"))
        if not isinstance(policy, str):
            policy.close()
        runs.append((spec, summary, episodes))
    out = out or f"runs/compare-{cfg.env.replace(':', '_').replace('.', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    save_comparison(out, runs)
    for label, (spec, summary, _) in zip("AB", runs):
        print(f"{label}: {format_summary(summary)}")
    print(format_comparison(compare_summary(runs[0][2], runs[1][2])))
    print(f"episodes and pairing index: {out}/  (view: atod-edge tui --diff {out}/a/episodes.jsonl "
          f"{out}/b/episodes.jsonl)")
    return 0


def cmd_export(args) -> int:
    try:
        from atod_edge.export.command import export_command
    except ImportError as e:
        raise UserError(f"export needs the export extra: pip install 'atod-edge[export]' ({e})") from None
    return export_command(args)


def cmd_tui(args) -> int:
    try:
        from atod_edge.tui.app import run_tui
    except ImportError as e:
        raise UserError(f"the TUI needs textual: pip install 'atod-edge[tui]' ({e})") from None
    if args.diff and args.path:
        raise UserError("--diff takes the two episode files itself: give no PATH with it")
    return run_tui(args.path, env=args.env, tokenizer=args.tokenizer, split=args.split, index=args.index,
                   theme=args.theme, diff=args.diff)


def cmd_env(args) -> int:
    from atod_edge.envs import env_class, list_envs

    if args.env_command in (None, "list"):
        for name in list_envs():
            try:
                cls = env_class(name)
            except UserError:
                print(f"{name:18s} (optional: pip install 'atod-edge[envs]', or [alfworld] for alfworld-engine)")
                continue
            print(f"{name:18s} max {cls.max_turns:2d} turns  {cls.description}")
        return 0
    return _play(env_class(args.env)(), args.split, args.seed)


def _play(env, split: str, index: int) -> int:
    task = env.tasks(split, 1, start=index)[0]
    print(env.reset(task))
    turns = 0
    while True:
        print("\nadmissible:", " | ".join(env.admissible_actions()[:30]))
        try:
            action = input("> ").strip()
        except EOFError:
            print()
            return 0
        if action in ("quit", "exit"):
            return 0
        if action == "expert":
            action = env.expert_action()
            print(f"(expert) {action}")
        result = env.step(action)
        turns += 1
        print(result.observation)
        if result.done:
            won = result.info.get("won", False)
            print(f"\n{'won' if won else 'done'} after {turns} turns, score {result.info.get('score', result.reward)}")
            return 0


def cmd_models(args) -> int:
    from atod_edge.models import loading as models

    if args.models_command in (None, "list"):
        for row in models.list_models():
            print("  ".join(f"{v}" for v in row.values()))
        return 0
    if args.models_command == "info":
        from atod_edge.models import zoo

        models.load_model(args.model, device="meta")   # refuse damaged weights before describing them
        for key, value in models.model_info(args.model).items():
            print(f"{key:18s} {value}")
        if zoo.is_zoo_name(args.model):
            print()
            print((zoo.model_dir(args.model) / zoo.CARD_MD).read_text(encoding="utf-8"), end="")
        return 0
    if args.models_command == "publish":
        return _publish(args)
    if args.models_command == "average":
        models.average_models(args.models, args.out)
        print(f"averaged {len(args.models)} models: {args.out}")
        return 0
    src = models.resolve_model(args.model)
    from transformers import AutoConfig

    n_layers = AutoConfig.from_pretrained(src).num_hidden_layers
    keep = models.parse_keep_layers(args.keep_layers, n_layers)
    models.shrink_model(src, keep, args.out)
    print(f"kept layers {keep} of {n_layers}: {args.out}")
    return 0


def _publish(args) -> int:
    from pathlib import Path

    from atod_edge.models import zoo

    try:
        chain = [line.rstrip() for line in Path(args.chain).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--chain {args.chain}: cannot read it ({type(e).__name__})") from None
    if not any(line.strip() for line in chain):
        raise UserError(f"--chain {args.chain} is empty: give the commands that made the model")
    root = Path(args.zoo) if args.zoo else zoo.ZOO_ROOT
    out = zoo.publish(args.model, args.name, chain, env=args.env, episodes=args.episodes,
                      description=args.description, trained_on=args.trained_on, root=root)
    print(f"{args.name}: {zoo.summary_line(zoo.read_card(args.name, root))}")
    print(f"zoo entry written: {out}/ (card: {out / zoo.CARD_MD})")
    return 0


def cmd_config(args) -> int:
    from atod_edge.config import describe, dump_yaml, load_config

    if args.stage == "train":
        from atod_edge.train.config import TrainConfig as cls
    elif args.stage == "sft":
        from atod_edge.train.sft import SFTConfig as cls
    else:
        from atod_edge.evaluate.evaluate import EvalConfig as cls
    if args.keys:
        for key, default, help_text in describe(cls):
            print(f"{key:32s} {default:16s} {help_text}")
        return 0
    print(dump_yaml(load_config(cls, args.recipe, args.overrides)), end="")
    return 0


def _progress_printer(label: str, unit: str):
    """A one-line progress display: done/total, rate and ETA."""
    started = time.perf_counter()

    def show(done: int, total: int) -> None:
        elapsed = time.perf_counter() - started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        end = "\n" if done >= total else ""
        print(f"\r{label}: {done}/{total} {unit}  {rate:.1f}/s  ETA {eta:.0f}s", end=end,
              file=sys.stderr, flush=True)

    return show


COMMANDS = {"train": cmd_train, "sft": cmd_sft, "eval": cmd_eval, "export": cmd_export,
            "tui": cmd_tui, "env": cmd_env, "models": cmd_models, "config": cmd_config}


if __name__ == "__main__":
    sys.exit(main())
