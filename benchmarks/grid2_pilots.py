"""Grid 2's pilots (benchmarks/results/grid2/PLAN.md), on the validation split only.

    python benchmarks/grid2_pilots.py --work DIR --out benchmarks/results/grid2

P1 cold starts (tiny-student SFT'd on N noisy demos) -> P2 GRPO at three lrs (40 steps) -> P3 OPD
(40 steps) with the gates G1 (mean |lp_T - lp_S| >= 0.5 nats at step 0) and G2 (OPD gains >= 10
points). Every model is scored on the same 200 `valid` tasks (temperature 0.4, eval seed 0).
Resumable: each finished piece is kept in OUT/pilots.json (written atomically) and skipped on a
rerun; models live under DIR (not committed). Run it on a frozen copy of the code (PLAN.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import bench_cli

from atod_edge.engine.policy import TorchPolicy
from atod_edge.evaluate.evaluate import EvalConfig, evaluate, paired_difference
from atod_edge.io import atomic_write_json

NS = (5, 10, 20, 40, 80, 160, 320)   # 80-320 added after 5-40 all scored 0% on valid (PLAN.md)
EPOCHS = int(os.environ.get("GRID2_P1_EPOCHS", "1"))   # P1b (PLAN.md): 4 epochs on N >= 80
NS = tuple(int(n) for n in os.environ["GRID2_P1_NS"].split(",")) if os.environ.get("GRID2_P1_NS") else NS
P1_KEY = "p1_cold_starts" if EPOCHS == 1 else f"p1_cold_starts_epochs{EPOCHS}"
LRS = (3e-4, 1e-4, 3e-5)
VALID_EPISODES = 200
PILOT_STEPS = 40
COMMON = ["--set", "env=household", "--set", "teacher=household-teacher", "--set", f"steps={PILOT_STEPS}",
          "--set", "tasks_per_step=4", "--set", "group_size=8", "--set", "max_new_tokens=20",
          "--set", "max_turns=15", "--set", "invalid_penalty=0.0", "--set", "eval_every=0",
          "--set", "eval_episodes=0", "--set", "compare=false", "--set", "checkpoint_every=10",
          "--set", "seed=0"]


log, cli = partial(bench_cli.log, "pilots"), partial(bench_cli.cli, "pilots")


def valid_outcomes(model: str) -> dict:
    policy = TorchPolicy.load(model)
    summary, episodes = evaluate(policy, EvalConfig(env="household", split="valid", episodes=VALID_EPISODES,
                                                    temperature=0.4, seed=0, max_turns=15))
    return {"success": summary["success"], "success_ci95": summary["success_ci95"],
            "turns": summary["turns"], "invalid_rate": summary["invalid_rate"],
            "task_id": [e.task_id for e in episodes], "won": [float(bool(e.success)) for e in episodes]}


def paired(after: dict, before: dict) -> dict:
    by_task = dict(zip(before["task_id"], before["won"]))
    a = [w for t, w in zip(after["task_id"], after["won"]) if t in by_task]
    b = [by_task[t] for t in after["task_id"] if t in by_task]
    return paired_difference(a, b)


def train_to_end(run: Path, algo: str, student: str, lr: float, **changes) -> None:
    """Train a pilot run to its last step: start it, or resume it where an interrupted one stopped.
    `changes`: COMMON's settings replaced or added (e.g. steps=150 for D1)."""
    settings = dict(item.split("=", 1) for item in COMMON if item != "--set")
    settings.update({key: str(value) for key, value in changes.items()})
    if (run / "checkpoints" / f"step_{int(settings['steps']):06d}").is_dir():
        return
    if (run / "metrics.jsonl").exists():
        cli("train", "--resume", str(run))
    else:
        cli("train", "--algo", algo, "--out", str(run), "--set", f"student={student}", "--set", f"lr={lr}",
            *[arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")])


def first_row(run_dir: Path) -> dict:
    with open(run_dir / "metrics.jsonl") as f:
        return json.loads(f.readline())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", default="benchmarks/results/grid2")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    state_path = out / "pilots.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}

    def save() -> None:
        atomic_write_json(state_path, state)

    state.setdefault("plan", "benchmarks/results/grid2/PLAN.md")
    state.setdefault("commit", os.environ.get("GRID2_COMMIT", ""))
    started = time.perf_counter()
    # P1: cold starts
    cold = state.setdefault(P1_KEY, {})
    for n in NS:
        key = str(n)
        if key in cold:
            continue
        model = work / (f"cold-{n}" if EPOCHS == 1 else f"cold-{n}-e{EPOCHS}")
        if not (model / "config.json").exists():
            cli("sft", "--model", "tiny-student", "--env", "household", "--demos", "noisy", "--episodes", str(n),
                "--out", str(model), "--set", "noise=0.3", "--set", f"epochs={EPOCHS}", "--set", "lr=1e-3",
                "--set", "batch_size=16", "--set", "prompt_loss_weight=0.0", "--set", "seed=0",
                "--set", "eval_episodes=0")   # no eval-split look: choices are made on valid only
        cold[key] = {"model": str(model), "valid": valid_outcomes(str(model))}
        log(f"P1 N={n}: valid success {cold[key]['valid']['success']:.1%}")
        save()
    if os.environ.get("GRID2_P1_ONLY"):
        return 0
    if "p1_choice" not in state:
        inside = [n for n in NS if 0.05 <= cold[str(n)]["valid"]["success"] <= 0.12]
        choice = inside[0] if inside else min(NS, key=lambda n: abs(cold[str(n)]["valid"]["success"] - 0.085))
        state["p1_choice"] = choice
        save()
    n = state["p1_choice"]
    # GRID2_COLD_N: the one retry PLAN.md allows when a gate fails (the next N of P1's list, toward the
    # gates); its P2/P3 records get the suffix "_n{N}" and its runs their own dirs
    retry = os.environ.get("GRID2_COLD_N")
    suffix = f"_n{int(retry)}" if retry and int(retry) != n else ""
    n = int(retry) if suffix else n
    cold_model, cold_valid = cold[str(n)]["model"], cold[str(n)]["valid"]
    log(f"P1 choice: N={n} ({cold_valid['success']:.1%} on valid)" + (" (the retry)" if suffix else ""))
    # P2: GRPO at each lr
    grpo = state.setdefault("p2_grpo" + suffix, {})
    for lr in LRS:
        key = f"{lr:g}"
        if key in grpo:
            continue
        run = work / f"grpo-lr{key}{suffix}"
        train_to_end(run, "grpo", cold_model, lr)
        final = sorted(run.glob("checkpoints/step_*"))[-1]
        valid = valid_outcomes(str(final))
        grpo[key] = {"run": str(run), "valid": valid, "vs_cold": paired(valid, cold_valid),
                     "seconds_per_step": None}
        log(f"P2 GRPO lr={key}: valid {valid['success']:.1%}, vs cold {grpo[key]['vs_cold']}")
        save()
    if "p2_choice" + suffix not in state:
        ok = [lr for lr in LRS if grpo[f"{lr:g}"]["vs_cold"]["ci95"][1] >= 0]
        state["p2_choice" + suffix] = max(ok) if ok else 3e-5
        save()
    lr = state["p2_choice" + suffix]
    # P3: OPD with the gates
    if "p3_opd" + suffix not in state:
        run = work / f"opd{suffix}"
        train_to_end(run, "opd", cold_model, lr)
        final = sorted(run.glob("checkpoints/step_*"))[-1]
        valid = valid_outcomes(str(final))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        step_s = sum(r.get("time_rollout", 0) + r.get("time_teacher", 0) + r.get("time_update", 0)
                     for r in rows if "step" in r and "eval_success" not in r) / max(1, len(rows))
        state["p3_opd" + suffix] = {"run": str(run), "valid": valid, "vs_cold": paired(valid, cold_valid),
                           "g1_mean_abs_log_ratio_step0": first_row(run).get("mean_abs_log_ratio"),
                           "seconds_per_step": step_s}
        save()
    p3 = state["p3_opd" + suffix]
    state["gates" + suffix] = {"G1": (p3["g1_mean_abs_log_ratio_step0"] or 0) >= 0.5,
                               "G2": p3["vs_cold"]["mean"] >= 0.10}
    state["wall_s_this_invocation"] = time.perf_counter() - started
    save()
    log(f"P3 OPD: {p3['vs_cold']}, gates {state['gates' + suffix]}, {p3['seconds_per_step']:.1f} s/step")
    if os.environ.get("GRID2_D1"):
        diagnostic_d1(work, state, save, suffix, cold_model, cold_valid, lr)
    return 0


D1_STEPS = 150


def diagnostic_d1(work: Path, state: dict, save, suffix: str, cold_model: str, cold_valid: dict, lr: float) -> None:
    """D1 (PLAN.md; a diagnostic, not a gate): OPD for the grid's 150 steps at the P2 lr, each
    50-step checkpoint scored on the same 200 valid tasks: does OPD gain at the grid's length?"""
    key = "d1_opd_150" + suffix
    found = state.setdefault(key, {"run": str(work / f"opd-s{D1_STEPS}{suffix}"), "lr": lr, "valid": {}})
    run = Path(found["run"])
    train_to_end(run, "opd", cold_model, lr, steps=D1_STEPS, checkpoint_every=50, keep_checkpoints=3)
    for checkpoint in sorted(run.glob("checkpoints/step_*")):
        step = str(int(checkpoint.name.split("_")[1]))
        if step in found["valid"]:
            continue
        valid = valid_outcomes(str(checkpoint))
        found["valid"][step] = {"valid": valid, "vs_cold": paired(valid, cold_valid)}
        log(f"D1 OPD step {step}: valid {valid['success']:.1%}, vs cold {found['valid'][step]['vs_cold']}")
        save()


if __name__ == "__main__":
    sys.exit(main())
