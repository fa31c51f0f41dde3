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

The floor: the least time each phase of the bf16 path's last step could take on this machine, from
the step's own episodes (the run's samples) and the machine measured in the same run
(machine_bounds: the best bf16 torch.matmul rate over the models' shapes and large squares, and the
memory bandwidth). Matmul FLOPs (machine_bounds.forward_flops: weights and attention) at that peak,
with the prefix reuse of an ideal engine: the teacher, the recompute and the update (3x a forward)
over one trie of all the step's turns (every shared token once; the code shares per micro-batch);
the rollout's prefill over one trie of all the step's prompts, and each decode step (one per token
position of every generate call, over the rows still decoding) at max(bf16 weights + KV bytes /
bandwidth, FLOPs / peak). Element-wise work, the sampler, the environment and the optimizer count
nothing. The step's floor bounds any speedup this machine allows: before / floor.
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

from atod_edge.io import atomic_path, atomic_write_json, atomic_write_text

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


def decode_floor_seconds(episodes, student, bandwidth_gb_s: float, peak_gflop_s: float) -> tuple[float, int]:
    """(seconds, decode steps) of the rollout's decode steps at their bound: per generate call
    (turn index k over the episodes that reach it), one step per token position after the
    first (which the prefill gives) over the rows still decoding, each reading the bf16 weights
    and the rows' bf16 KV (machine_bounds.decode_step_cost and bound)."""
    from machine_bounds import bound, decode_step_cost

    calls: dict[int, list[tuple[int, int]]] = {}
    for ep in episodes:
        for k, t in enumerate(ep.turns):
            if t.response_ids:
                calls.setdefault(k, []).append((len(t.prompt_ids), len(t.response_ids)))
    seconds, steps = 0.0, 0
    for rows in calls.values():
        for j in range(1, max(r for _, r in rows)):
            live = [n + j for n, r in rows if r > j]
            cost = decode_step_cost(student, len(live), sum(live) / len(live), weight_bytes=2, kv_bytes=2)
            seconds += bound(cost, bandwidth_gb_s, peak_gflop_s)["step_ms"] / 1e3
            steps += 1
    return seconds, steps


def step_floor(run: Path, student_src: Path, log) -> dict:
    """The floor of the run's last step (see the docstring), with the machine measured now."""
    from machine_bounds import forward_flops, matmul_rates, memory_bandwidth, model_dims, model_shapes, trie_work

    from atod_edge.models.loading import load_model
    from atod_edge.rollout.episode import read_episodes

    samples = sorted((run / "samples").glob("step_*.jsonl"))
    episodes, _ = read_episodes(samples[-1])
    student, _ = load_model(str(student_src))
    teacher, _ = load_model("smollm2-135m")
    shapes = sorted({*model_shapes(model_dims(student.config), 16), *model_shapes(model_dims(teacher.config), 16),
                     (1024, 1024, 1024), (2048, 2048, 2048), (4096, 576, 1536), (4096, 1536, 576)})
    log("step", f"measuring the machine: bf16 matmul rates of {len(shapes)} shapes, memory bandwidth")
    rates = matmul_rates(shapes, dtypes=("bfloat16",))
    peak = max(r["gflop_s"] for r in rates)
    bandwidth = memory_bandwidth()
    turns = [t for ep in episodes for t in ep.turns if t.response_ids]
    response_tokens = sum(len(t.response_ids) for t in turns)
    scored = trie_work([list(t.prompt_ids) + list(t.response_ids[:-1]) for t in turns], min_shared=1)
    prefill = trie_work([list(t.prompt_ids) for t in turns], min_shared=1)
    flops = {"time_teacher": forward_flops(teacher, scored[0], response_tokens, scored[1]),
             "time_recompute": forward_flops(student, scored[0], response_tokens, scored[1]),
             "time_update": 3 * forward_flops(student, scored[0], response_tokens, scored[1]),
             "rollout_prefill": forward_flops(student, prefill[0], len(turns), prefill[1])}
    decode_s, decode_steps = decode_floor_seconds(episodes, student, bandwidth["gb_s"], peak)
    seconds = {k: v / (peak * 1e9) for k, v in flops.items() if k != "rollout_prefill"}
    seconds["time_rollout"] = flops["rollout_prefill"] / (peak * 1e9) + decode_s
    del student, teacher
    return {"samples": str(samples[-1].name), "episodes": len(episodes), "turns": len(turns),
            "response_tokens": response_tokens, "scored_trie_tokens": scored[0], "prompt_trie_tokens": prefill[0],
            "decode_steps": decode_steps, "decode_floor_seconds": decode_s,
            "bf16_peak_gflop_s": peak, "matmul_rates": rates, "bandwidth": bandwidth,
            "gflop": {k: v / 1e9 for k, v in flops.items()}, "phases": seconds, "step": sum(seconds.values())}


def plot_step(result: dict, path: Path) -> None:
    """step.png: each path's last step as a bar of its phases, and the floor, on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"before ({result['before_commit']}), fp32", result["paths"]["before"]["phases_last_step"]),
            ("now, fp32", result["paths"]["fp32"]["phases_last_step"]),
            ("now, bf16", result["paths"]["bf16"]["phases_last_step"]),
            ("floor of the bf16 step", result["floor"]["phases"])]
    colors = {"time_rollout": "#4c72b0", "time_teacher": "#dd8452", "time_recompute": "#937860",
              "time_update": "#55a868"}
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for y, (label, phases) in enumerate(reversed(bars)):
        left = 0.0
        for k in PHASES:
            ax.barh(y, phases[k], left=left, color=colors[k], label=k.removeprefix("time_") if y == 0 else None)
            left += phases[k]
        ax.text(left + 0.5, y, f"{left:.1f} s", va="center", fontsize=9)
    ax.set_yticks(range(len(bars)), [label for label, _ in reversed(bars)])
    ax.set_xlabel("seconds (one ATOD step, SmolLM2 setting, 2 cores)")
    ax.set_xlim(0, max(sum(p.values()) for _, p in bars) * 1.12)
    ax.legend(ncol=4, fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


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
    floor = result["floor"] = step_floor(args.work / "run-bf16", student, bench_cli.log)
    result["floor_speedup_vs_before"] = before["step_seconds_last"] / floor["step"]
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
    lines += ["", f"## The floor on this machine (bf16 path, last step: {floor['turns']} turns, "
              f"{floor['response_tokens']:,} response tokens)", "",
              f"Measured in this run: bf16 matmul peak {floor['bf16_peak_gflop_s']:.0f} GFLOP/s (best of "
              f"{len(floor['matmul_rates'])} shapes), memory bandwidth {floor['bandwidth']['gb_s']:.1f} GB/s. "
              f"Tries: {floor['scored_trie_tokens']:,} tokens scored (teacher, recompute, update), "
              f"{floor['prompt_trie_tokens']:,} prompt tokens prefilled; {floor['decode_steps']} decode steps.", "",
              "| phase | GFLOP | floor (s) | now, bf16 (s) | now / floor |", "|---|---|---|---|---|"]
    for k in PHASES:
        f, b = floor["phases"][k], bf16["phases_last_step"][k]
        gflop = floor["gflop"].get(k, floor["gflop"]["rollout_prefill"])
        lines.append(f"| {k.removeprefix('time_')} | {gflop:,.0f}{' prefill + decode' if k == 'time_rollout' else ''} | "
                     f"{f:.1f} | {b:.1f} | {b / f if f else 0:.1f}x |")
    lines.append(f"| **step** | | **{floor['step']:.1f}** | **{bf16['step_seconds_last']:.1f}** | "
                 f"**{bf16['step_seconds_last'] / floor['step']:.1f}x** |")
    lines += ["", f"The most this machine allows: before / floor = {before['step_seconds_last']:.1f} / "
              f"{floor['step']:.1f} s = **{result['floor_speedup_vs_before']:.2f}x**."]
    lines += ["", "![one step per path and the floor](step.png)"]
    atomic_write_text(args.out / "step.md", "\n".join(lines) + "\n")
    plot_step(result, args.out / "step.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
