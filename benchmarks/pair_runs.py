"""Paired comparison of two sets of compare.py runs (e.g. a diagnostic variant against a grid row).

    python benchmarks/pair_runs.py A_DIR:METHOD B_DIR:METHOD [--env household] [--split eval]
        [--label-a NAME] [--label-b NAME] [--out FILE.md]

A_DIR and B_DIR are compare.py output folders (their runs/ hold {env}-{method}-s{seed}); the runs of
the same seed are paired task by task on their final evaluations, exactly as results.md pairs the
grid's claims (compare_report.paired_differences and paired_bootstrap: 10,000 resamples of the
tasks). Prints, and with --out writes, each side's success per seed and the paired difference with
its 95% interval.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import compare_report as report  # noqa: E402


def side(spec: str, env: str, split: str) -> tuple[str, dict]:
    folder, _, method = spec.rpartition(":")
    if not folder or not method:
        raise SystemExit(f"pair_runs: '{spec}' is not DIR:METHOD")
    runs = [r for r in report.load_runs(Path(folder)) if r.env == env and r.method == method and r.done]
    outcomes = {r.seed: r.outcomes[split] for r in runs if split in r.outcomes}
    if not outcomes:
        raise SystemExit(f"pair_runs: no finished {env}-{method} runs with {split} outcomes in {folder}/runs")
    return method, outcomes


def main() -> None:
    from atod_edge.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--env", default="household")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--label-a")
    parser.add_argument("--label-b")
    parser.add_argument("--out")
    args = parser.parse_args()
    (method_a, a), (method_b, b) = side(args.a, args.env, args.split), side(args.b, args.env, args.split)
    name_a, name_b = args.label_a or method_a, args.label_b or method_b
    paired = report.paired_differences(a, b)
    if paired is None:
        raise SystemExit("pair_runs: the two sides share no seed and task")
    diffs, seeds = paired
    stats = report.paired_bootstrap([diffs])
    success = lambda outcomes, s: 100 * sum(outcomes[s]["success"]) / len(outcomes[s]["success"])  # noqa: E731
    lines = [f"| seed | {name_a} | {name_b} | difference |", "|---|---|---|---|"]
    lines += [f"| {s} | {success(a, s):.1f}% | {success(b, s):.1f}% | {100 * d:+.1f} |"
              for s, d in zip(seeds, stats["per_seed"])]
    low, high = stats["ci95"]
    lines += ["", f"{name_a} - {name_b} ({args.env} {args.split}): {100 * stats['diff']:+.1f} points, 95% interval "
              f"[{100 * low:+.1f}, {100 * high:+.1f}], paired over {diffs.shape[1]} tasks x {len(seeds)} seeds "
              f"(verdict at 0: {report.verdict(stats['ci95'])})"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")


if __name__ == "__main__":
    main()
