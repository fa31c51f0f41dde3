"""The SmolLM2 chain's table: cold start, teacher and ATOD student on the eval and unseen splits,
with paired differences over the same tasks, from one `compare.py --recipe smollm2-household` run.

    python benchmarks/smollm2_table.py benchmarks/results/smollm2-household/atod \\
        --out benchmarks/results/smollm2-household --name table

Reads OUT_DIR/models/household/{cold-start,teacher}.json and the run's final_eval.json (every model
played the same tasks with the same sampling seed), writes NAME.md and NAME.json. Paired
differences: per task, success of one model minus the other's, mean with its 95% t interval over
tasks (atod_edge.evaluate.paired_difference, as the default job's table). One training seed: the
interval covers the tasks, not the variance between training runs. The smallest effect the
design detects (80% power, two-sided alpha 0.05) is 2.8 standard errors of the paired mean, and
at least 7.84 / (n + 7.84) (a model that wins d of the other's lost tasks and nothing else).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from atod_edge.evaluate.evaluate import paired_difference
from atod_edge.io import atomic_write_json, atomic_write_text

SPLITS = ("eval", "unseen")
MODELS = ("cold start", "teacher", "ATOD student")
PAIRS = (("ATOD student", "cold start"), ("ATOD student", "teacher"), ("teacher", "cold start"))


def load_models(compare_dir: Path, run: str) -> dict[str, dict]:
    files = {"cold start": compare_dir / "models" / "household" / "cold-start.json",
             "teacher": compare_dir / "models" / "household" / "teacher.json",
             "ATOD student": compare_dir / "runs" / run / "final_eval.json"}
    models = {}
    for name, path in files.items():
        if path.is_file():
            models[name] = json.loads(path.read_text())
    return models


def paired(a: dict, b: dict) -> dict:
    """a - b over the tasks both played (matched by task id)."""
    wins_b = dict(zip(b["task_id"], b["success"]))
    common = [(s, wins_b[t]) for t, s in zip(a["task_id"], a["success"]) if t in wins_b]
    result = paired_difference([x for x, _ in common], [y for _, y in common])
    n = result["n"]
    diffs = [x - y for x, y in common]
    sd = math.sqrt(sum((d - result["mean"]) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
    # 2.8 standard errors of the paired mean; at least the effect of a model that wins d of the
    # tasks the other loses and nothing else (sd sqrt(d(1 - d))): d = 7.84 / (n + 7.84), the floor
    # when both models sit at 0% and the observed spread is 0
    floor = 2.8 ** 2 / (n + 2.8 ** 2) if n else float("nan")
    result["detectable"] = max(2.8 * sd / math.sqrt(n), floor) if n > 1 else float("nan")
    result["discordant"] = sum(d != 0 for d in diffs)
    return result


def build(models: dict[str, dict]) -> dict:
    table = {split: {} for split in SPLITS}
    for split in SPLITS:
        for name in MODELS:
            if name in models and split in models[name]:
                table[split][name] = models[name][split]["summary"]
    differences = {split: {} for split in SPLITS}
    for split in SPLITS:
        for a, b in PAIRS:
            if a in models and b in models and split in models[a] and split in models[b]:
                differences[split][f"{a} - {b}"] = paired(models[a][split]["episodes"], models[b][split]["episodes"])
    return {"table": table, "paired": differences}


def markdown(result: dict, command: str) -> str:
    lines = ["# SmolLM2 on household: cold start, teacher, ATOD student", "",
             f"`{command}`", "",
             "Every model plays the same 200 tasks per split with the same sampling seed (temperature 0.4, "
             "15-turn limit, bf16 weights). One training seed: the paired intervals cover the tasks, not "
             "the variance between training runs.", ""]
    for split in SPLITS:
        lines += [f"## {split} split", "", "| model | success | 95% CI | turns | invalid actions |", "|---|---|---|---|---|"]
        for name in MODELS:
            s = result["table"][split].get(name)
            if s is None:
                lines.append(f"| {name} | — | — | — | — |")
                continue
            low, high = s["success_ci95"]
            lines.append(f"| {name} | {100 * s['success']:.1f}% | [{100 * low:.1f}%, {100 * high:.1f}%] | "
                         f"{s['turns']:.1f} | {100 * s['invalid_rate']:.1f}% |")
        lines.append("")
        for key, d in result["paired"][split].items():
            low, high = d["ci95"]
            lines.append(f"- {key}: **{100 * d['mean']:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}]** over "
                         f"{d['n']} tasks ({d['discordant']} discordant); smallest detectable effect "
                         f"{100 * d['detectable']:.1f} points")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compare_dir", type=Path, help="the compare.py --out directory")
    parser.add_argument("--run", default="household-atod-s0", help="the run's directory name under runs/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="table")
    args = parser.parse_args(argv)
    models = load_models(args.compare_dir, args.run)
    if not models:
        raise SystemExit(f"{args.compare_dir}: no model evaluations (models/household/*.json, runs/*/final_eval.json)")
    result = build(models)
    command = f"python benchmarks/smollm2_table.py {args.compare_dir} --out {args.out} --name {args.name}"
    atomic_write_json(args.out / f"{args.name}.json", result)
    text = markdown(result, command)
    atomic_write_text(args.out / f"{args.name}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
