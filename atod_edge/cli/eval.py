"""`atod-edge eval`: evaluate one agent on an environment split, or two on the same seeded tasks.

The agents are models (checkpoint dir, preset, .onnx, .gguf: engine.backends.load_policy) or the
scripted `expert` / `random`; evaluate.evaluate plays them and writes report.json + episodes.jsonl,
or for two agents OUT/a/, OUT/b/ and the pairing index that `atod-edge tui --diff` opens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from atod_edge.cli.options import add_recipe_args, shortcut_overrides
from atod_edge.errors import UserError

SCRIPTED = ("expert", "random")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a policy on an environment split")
    add_recipe_args(p, "recipe YAML (optional)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--model", action="append",
                     help="checkpoint dir, preset, .onnx file/dir or .gguf file; twice (--model A --model B) "
                          "compares A and B on the same seeded tasks")
    who.add_argument("--policy", choices=list(SCRIPTED), help="a scripted policy")
    p.add_argument("--compare", metavar="AGENT",
                   help="a second agent (model, or expert/random) played on the same seeded tasks: writes "
                        "OUT/a/, OUT/b/ and the pairing index OUT/pairs.json, for `atod-edge tui --diff`")
    p.add_argument("--env", help="environment name or pkg.module:Class")
    p.add_argument("--split", choices=["train", "valid", "eval", "unseen"])
    p.add_argument("--episodes", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--device", help="torch device (cpu, cuda)")
    p.add_argument("--out", help="directory for report.json and episodes.jsonl: new, or an earlier evaluation "
                                 "(replaced once the new one is complete)")
    p.add_argument("--force", action="store_true",
                   help="let --out replace a non-empty directory that is not an earlier evaluation")


def run(args: argparse.Namespace) -> int:
    from atod_edge.config import load_config
    from atod_edge.evaluate.evaluate import EvalConfig
    from atod_edge.io import check_output

    overrides = shortcut_overrides(args, ("env", "split", "episodes", "temperature", "device"))
    cfg = load_config(EvalConfig, args.recipe, overrides)
    agents = [*(args.model or []), *([args.policy] if args.policy else []), *([args.compare] if args.compare else [])]
    if len(agents) > 2:
        raise UserError(f"a comparison takes two agents, got {len(agents)}: {', '.join(agents)}")
    if len(agents) < 2 and not args.policy and not args.model:
        raise UserError("give --model PATH or --policy expert|random")
    # the output path is checked before any agent is loaded or played (io.check_output)
    default = "compare" if len(agents) == 2 else "eval"
    out = args.out or f"runs/{default}-{_env_slug(cfg.env)}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_output(out, "eval", force=args.force)
    if len(agents) == 2:
        return _compare(cfg, agents, out, args.force)
    if args.policy:
        policy = _load_agent(args.policy, cfg, scripted=True)
    else:
        policy = _load_agent(args.model[0], cfg, scripted=False)   # --model appends: one here
    return _evaluate_one(cfg, policy, out, args.force)


def _evaluate_one(cfg, policy, out: str, force: bool) -> int:
    from atod_edge.evaluate.evaluate import evaluate, format_summary, save_eval

    summary, episodes = evaluate(policy, cfg, progress=_progress_printer("eval", "episodes"))
    save_eval(out, summary, episodes, force=force)
    print(format_summary(summary))
    print(f"report and episodes: {out}/")
    _refuse_if_every_episode_failed(summary)
    return 0


def _refuse_if_every_episode_failed(summary: dict) -> None:
    """An evaluation whose every episode ended in an env error measured nothing: exit non-zero."""
    from atod_edge.evaluate.evaluate import all_failed_by_error

    if all_failed_by_error(summary):
        raise UserError(f"every one of {summary['episodes']} episodes ended in an env error "
                        f"(first: {summary.get('first_error')})")


def _compare(cfg, agents: list[str], out: str, force: bool) -> int:
    """Evaluate two agents with one config (same tasks, same sampling seeds) and pair them. Both
    are loaded before either plays: a B that does not load costs no evaluation of A."""
    from atod_edge.evaluate.evaluate import compare_summary, evaluate, format_comparison, format_summary, save_comparison

    # a file or directory named like a scripted policy is a model
    policies = [_load_agent(spec, cfg, scripted=spec in SCRIPTED and not Path(spec).exists())
                for spec in agents]
    runs = []
    for label, spec, policy in zip("ab", agents, policies):
        summary, episodes = evaluate(policy, cfg, progress=_progress_printer(f"eval {label.upper()}", "episodes"))
        if not isinstance(policy, str):
            policy.close()
        runs.append((spec, summary, episodes))
    save_comparison(out, runs)
    for label, (spec, summary, _) in zip("AB", runs):
        print(f"{label}: {format_summary(summary)}")
    print(format_comparison(compare_summary(runs[0][2], runs[1][2])))
    print(f"episodes and pairing index: {out}/  (view: atod-edge tui --diff {out}/a/episodes.jsonl "
          f"{out}/b/episodes.jsonl)")
    for _, summary, _ in runs:
        _refuse_if_every_episode_failed(summary)
    return 0


def _load_agent(spec: str, cfg, scripted: bool):
    """The scripted policy's name as evaluate() takes it, or the model loaded as a Policy (a
    PyTorch model's weights in cfg.precision; an ONNX or GGUF file keeps its own)."""
    if scripted:
        return spec
    from atod_edge.engine.backends import is_torch_model, load_policy

    if cfg.precision == "auto":
        return load_policy(spec, device=cfg.device)
    if not is_torch_model(spec):
        raise UserError(f"precision={cfg.precision} applies to PyTorch models; {spec} is an ONNX or GGUF "
                        "export (its precision is the export's)")
    return load_policy(spec, device=cfg.device, precision=cfg.precision)   # weights and autocast in it


def _env_slug(env: str) -> str:
    return env.replace(":", "_").replace(".", "_")


def _progress_printer(label: str, unit: str):
    """A one-line progress display on stderr: done/total, rate and ETA."""
    started = time.perf_counter()

    def show(done: int, total: int) -> None:
        elapsed = time.perf_counter() - started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        end = "\n" if done >= total else ""
        print(f"\r{label}: {done}/{total} {unit}  {rate:.1f}/s  ETA {eta:.0f}s", end=end,
              file=sys.stderr, flush=True)

    return show
