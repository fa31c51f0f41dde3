"""One ATOD step at SmolLM2 scale on CPU: the path before issue 27 (the code at --before, fp32), today's
fp32 path (the CPU default) and bf16 (autocast for the teacher and the update, rollouts on a bf16 copy of
the student), side by side in one run.

    OMP_NUM_THREADS=2 taskset -c 0,1 python benchmarks/bench_smollm2_step.py --work DIR

The "before" path runs the same command from a git worktree of this repository at --before (default
f404d54, the last commit before issue 27's engine and scoring changes) made in WORK.

The setting of issue 27: teacher SmolLM2-135M-Instruct (the `smollm2-135m` preset), student the
preset cut to every third layer (`atod-edge models shrink smollm2-135m --keep-layers every:3`), 4
tasks x 4 rollouts, 15 turns, 48 new tokens. Both are untrained for household, so every turn runs
to the 48-token limit on both paths: the same number of tokens decoded, scored and trained on,
though not the same tokens (the samples differ with the precision). Each path runs `atod-edge
train` for `--steps` steps (the first includes one-time start-up costs, reported apart; no
gradient-norm passes: grad_norm_every=0), and its
metrics rows give each phase's seconds (rollout, teacher, recompute, update). Writes
benchmarks/results/smollm2-household/step.json and step.md (the per-phase table and the speedup of
the whole step, fp32 / bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from functools import partial
from pathlib import Path

import bench_cli
from bench_rollout import ensure_smollm2_cut

from atod_edge.io import atomic_write_json, atomic_write_text

OUT = Path(__file__).parent / "results" / "smollm2-household"
PATHS = {"before": ["precision=fp32", "rollout_precision=fp32"],
         "fp32": ["precision=fp32", "rollout_precision=fp32"],
         "bf16": ["precision=bf16", "rollout_precision=bf16"]}
BEFORE = "f404d54"   # the last commit before issue 27's changes to the engine and the scorers
SETTING = ["env=household", "teacher=smollm2-135m", "tasks_per_step=4", "group_size=4", "max_turns=15",
           "max_new_tokens=48", "micro_batch=16", "lr=1e-5", "eval_episodes=0", "compare=false", "seed=0",
           # a regular step: grad_norm_every logs each advantage term's gradient norm at steps 0, N, 2N
           # with two more forward + backward passes, which tripled step 0's update
           "grad_norm_every=0",
           # every episode's token ids in the run's samples: the FLOPs of each phase (the floor) are counted on them
           "sample_episodes=16"]
PHASES = ("time_rollout", "time_teacher", "time_recompute", "time_update")


def student_cut(work: Path) -> Path:
    """bench_rollout's SmolLM2 cut (every third layer), made in WORK when missing."""
    cut = work / "smollm2-every3"
    why = ensure_smollm2_cut(cut, partial(bench_cli.log, "step"))
    if why:
        raise SystemExit(f"cannot make the SmolLM2 student: {why}")
    return cut


def before_code(work: Path, commit: str) -> Path:
    """A git worktree of this repository at `commit` in WORK (made when missing)."""
    tree = work / f"code-{commit}"
    if not (tree / "atod_edge").is_dir():
        repo = Path(__file__).resolve().parent.parent
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], check=True)
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), commit], check=True)
    return tree


def run_path(name: str, student: Path, work: Path, steps: int, code: Path | None = None) -> list[dict]:
    run = work / f"run-{name}"
    args = [f"student={student}", f"steps={steps}", f"checkpoint_every={steps}", *SETTING, *PATHS[name]]
    if not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < steps:
        shutil.rmtree(run, ignore_errors=True)   # this benchmark's own run dir, from an unfinished try
        bench_cli.cli("step", "train", "--out", str(run), *[a for kv in args for a in ("--set", kv)],
                      code=str(code) if code else None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "time_rollout" in r][:steps]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path, help="where the runs go (not committed)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--before", default=BEFORE, help="the commit whose fp32 path is the 'before' row")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load = os.getloadavg()
    student = student_cut(args.work)
    result = {"command": "OMP_NUM_THREADS=2 taskset -c 0,1 python benchmarks/bench_smollm2_step.py --work DIR "
                         f"--steps {args.steps}",
              "setting": SETTING, "student": "smollm2-135m cut to every third layer (11 of 30)",
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "affinity": sorted(os.sched_getaffinity(0)), "load_average_start": load}, "paths": {}}
    result["before_commit"] = args.before
    code = {"before": before_code(args.work, args.before)}
    for name in ("bf16", "fp32", "before"):
        rows = run_path(name, student, args.work, args.steps, code.get(name))
        last = rows[-1]   # the first step also pays one-time start-up costs
        result["paths"][name] = {
            "settings": PATHS[name], "steps": [{k: r.get(k) for k in (*PHASES, "step", "generated_tokens", "prompt_tokens",
                                                                         "turns", "success")} for r in rows],
            "phases_last_step": {k: last.get(k, 0.0) for k in PHASES},
            "step_seconds_last": sum(last.get(k, 0.0) for k in PHASES)}
    before, fp32, bf16 = result["paths"]["before"], result["paths"]["fp32"], result["paths"]["bf16"]
    result["speedup"] = fp32["step_seconds_last"] / bf16["step_seconds_last"]
    result["phase_speedup"] = {k: fp32["phases_last_step"][k] / max(bf16["phases_last_step"][k], 1e-9) for k in PHASES}
    # issue 27's target: the step against the path before its changes
    result["speedup_vs_before"] = before["step_seconds_last"] / bf16["step_seconds_last"]
    result["fp32_speedup_vs_before"] = before["step_seconds_last"] / fp32["step_seconds_last"]
    result["seconds"] = time.perf_counter() - started
    result["machine"]["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "step.json", result)
    lines = ["# One ATOD step at SmolLM2 scale on this CPU: before issue 27, fp32 and bf16 now", "",
             f"`{result['command']}`; teacher SmolLM2-135M-Instruct, student {result['student']}, "
             "4 tasks x 4 rollouts, 15 turns, 48 new tokens (untrained: every turn runs to 48 tokens on every "
             f"path). The last of {args.steps} steps of each path (the first pays start-up costs). 'before': the "
             f"fp32 path of the code at {args.before}.", "",
             "| phase | before, fp32 (s) | now, fp32 (s) | now, bf16 (s) | before / bf16 | fp32 / bf16 |",
             "|---|---|---|---|---|---|"]
    for k in PHASES:
        b = bf16["phases_last_step"][k]
        lines.append(f"| {k.removeprefix('time_')} | {before['phases_last_step'][k]:.1f} | "
                     f"{fp32['phases_last_step'][k]:.1f} | {b:.1f} | "
                     f"{before['phases_last_step'][k] / b if b else 0:.2f}x | {result['phase_speedup'][k]:.2f}x |")
    lines.append(f"| **step** | **{before['step_seconds_last']:.1f}** | **{fp32['step_seconds_last']:.1f}** | "
                 f"**{bf16['step_seconds_last']:.1f}** | **{result['speedup_vs_before']:.2f}x** | "
                 f"**{result['speedup']:.2f}x** |")
    tokens = {n: (p["steps"][-1]["generated_tokens"], p["steps"][-1]["prompt_tokens"]) for n, p in result["paths"].items()}
    lines += ["", "Tokens of the last step (generated, prompt): " + ", ".join(
        f"{n} {g:,} / {q:,}" for n, (g, q) in tokens.items()) + "."]
    atomic_write_text(args.out / "step.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
