"""Which compact student to cut from the SmolLM2 household teacher (issue 28), on the validation split.

    python benchmarks/smollm2_cut_curve.py --teacher smollm2-household-teacher --work DIR \
        --out benchmarks/results/smollm2-household

For every cut (decoder layers kept, `atod-edge models shrink --keep-layers`), the teacher is cut,
cold-started by a short SFT on a few DART demos (the recipe's cold start), and scored on the same
`valid` tasks (train-distribution tasks that neither training nor the eval/unseen tables use):
success with its 95% interval, invalid actions, parameters, and the decode speed of the engine.
The teacher itself is scored the same way. The rule that picks the cut is fixed in PLAN.md before
the run (`choose`). Resumable: each finished cut is kept in OUT/cut_curve.json (written atomically)
and skipped on a rerun; models live under DIR (not committed). Run it on a frozen copy of the code.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import bench_cli

from atod_edge.io import atomic_write_json, atomic_write_text

CUTS = ("every:2", "every:3", "every:5")   # 16, 11 and 7 of SmolLM2-135M's 30 layers (the last always kept)
VALID_EPISODES = 100
COLD_START = ["--demos", "dart", "--episodes", "{episodes}", "--set", "noise=0.3", "--set", "epochs=1",
              "--set", "lr={lr}", "--set", "batch_size=8", "--set", "micro_batch=8", "--set", "precision=bf16",
              "--set", "eval_episodes=0", "--set", "seed=0", "--set", "checkpoint_every=20"]
MIN_VALID_SUCCESS = 0.05   # GRPO needs episodes that win: a cold start below this gives it no signal


log, cli = partial(bench_cli.log, "cut-curve"), partial(bench_cli.cli, "cut-curve")


def score(model: str) -> dict:
    """Success on the valid split (temperature 0.4, seed 0, the env's turn limit), bf16 weights."""
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate

    policy = TorchPolicy.load(model, precision="bf16")
    summary, episodes = evaluate(policy, EvalConfig(env="household", split="valid", episodes=VALID_EPISODES,
                                                    temperature=0.4, seed=0))
    return {"success": summary["success"], "success_ci95": summary["success_ci95"], "turns": summary["turns"],
            "invalid_rate": summary["invalid_rate"], "tokens_per_s": summary.get("tokens_per_s"),
            "params": sum(p.numel() for p in policy.model.parameters()),
            "layers": policy.model.config.num_hidden_layers,
            "won": {e.task_id: int(bool(e.success)) for e in episodes}}


def choose(curve: dict) -> str | None:
    """The fewest layers whose cold start wins at least MIN_VALID_SUCCESS of the valid episodes
    (PLAN.md, step 2); None when no cut does."""
    fit = [(row["layers"], cut) for cut, row in curve.items() if row["success"] >= MIN_VALID_SUCCESS]
    return min(fit)[1] if fit else None


def cold_start(episodes: int, lr: str) -> list[str]:
    return [arg.format(episodes=episodes, lr=lr) for arg in COLD_START]


def render(state: dict, out: Path, name: str = "cut_curve", cuts=CUTS) -> None:
    cold = " ".join(cold_start(state.get("cold_episodes", 30), state.get("cold_lr", "1e-4")))
    lines = ["# SmolLM2 student cuts: the cold starts on the valid split", "",
             f"Each cut of `{state['teacher']}` cold-started by `atod-edge sft {cold}`; "
             f"{VALID_EPISODES} valid episodes each (temperature 0.4, seed 0, bf16 weights). "
             "Written by `python benchmarks/smollm2_cut_curve.py`.", "",
             "| model | layers | parameters | valid success | 95% CI | invalid actions | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    rows = ([("teacher", state["teacher_valid"])] if "teacher_valid" in state else []) + \
        [(f"cut {cut}", row) for cut, row in state["curve"].items()]
    for label, r in rows:
        low, high = r["success_ci95"]
        lines.append(f"| {label} | {r['layers']} | {r['params'] / 1e6:.1f}M | {r['success']:.1%} | "
                     f"[{low:.1%}, {high:.1%}] | {r['invalid_rate']:.1%} | {r['tokens_per_s'] or 0:.0f} |")
    if state.get("chosen") is not None or len(state["curve"]) == len(cuts):
        lines += ["", f"Chosen by the rule of PLAN.md (fewest layers with at least {MIN_VALID_SUCCESS:.0%} on valid): "
                      f"**{state.get('chosen') or 'none'}**."]
    atomic_write_text(out / f"{name}.md", "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the teacher (zoo name or model dir)")
    parser.add_argument("--work", required=True, type=Path, help="where the cut models go (not committed)")
    parser.add_argument("--out", required=True, type=Path, help="where cut_curve.json/.md go")
    parser.add_argument("--cuts", default=",".join(CUTS), help="layer specs to try, in this order")
    parser.add_argument("--cold-episodes", type=int, default=30, help="DART demos of each cold start")
    parser.add_argument("--cold-lr", default="1e-4", help="the cold start's learning rate")
    parser.add_argument("--name", default="cut_curve", help="result files NAME.json and NAME.md")
    parser.add_argument("--stop-at-first", action="store_true",
                        help="stop at the first cut that passes the rule (give --cuts fewest layers first)")
    args = parser.parse_args()
    cuts = tuple(args.cuts.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    state = json.loads(path.read_text()) if path.is_file() else {}
    state.setdefault("teacher", args.teacher)
    state.setdefault("cold_episodes", args.cold_episodes)
    state.setdefault("cold_lr", args.cold_lr)
    state.setdefault("curve", {})

    def save() -> None:
        atomic_write_json(path, state)
        render(state, args.out, args.name, cuts)

    if "teacher_valid" not in state:
        log(f"teacher {args.teacher} on valid")
        state["teacher_valid"] = score(args.teacher)
        save()
    for cut in cuts:
        if args.stop_at_first and choose(state["curve"]) is not None:
            break
        if cut in state["curve"]:
            continue
        name = f"cut-{cut.replace(':', '')}-{args.cold_episodes}"
        started = time.perf_counter()
        if not (args.work / name / "config.json").is_file():
            cli("models", "shrink", args.teacher, "--keep-layers", cut, "--out", str(args.work / name), "--force")
        cold = args.work / f"{name}-cold"
        if not (cold / "config.json").is_file():
            resume = ["--resume", str(cold)] if (args.work / f"{name}-cold.work" / "config.yaml").is_file() else []
            cli("sft", *(resume or ["--model", str(args.work / name), "--env", "household",
                                    *cold_start(args.cold_episodes, args.cold_lr),
                                    "--out", str(cold)]))
        row = score(str(cold))
        row["seconds"] = time.perf_counter() - started
        state["curve"][cut] = row
        log(f"{cut}: {row['layers']} layers, valid {row['success']:.1%}, invalid {row['invalid_rate']:.1%}")
        save()
    state["chosen"] = choose(state["curve"])
    save()
    log(f"chosen: {state['chosen']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
