"""Grid 2's pilots as a page and a picture: benchmarks/results/grid2/pilots.md and pilots.png.

    python benchmarks/grid2_report.py [--out benchmarks/results/grid2]

Reads OUT/pilots.json (benchmarks/grid2_pilots.py) and writes, for every model the pilots scored on
the 200 validation tasks: its success with the 95% interval, and each pilot's paired difference to
its cold start (95% t interval over the 200 tasks) against the gate PLAN.md set for it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from atod_edge.io import atomic_path, atomic_write_text

G2_GATE = 0.10   # PLAN.md: OPD gains >= 10 points in 40 steps


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def interval(d: dict) -> str:
    low, high = d["ci95"]
    return f"{100 * d['mean']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def rows(state: dict) -> list[dict]:
    """One row per scored model: label, group, valid success, paired difference to its cold start."""
    out = []
    teacher = state.get("teacher_valid")
    if teacher:
        out.append({"label": "teacher (household-teacher)", "group": "reference", "valid": teacher})
    for key, epochs in (("p1_cold_starts", 1), ("p1_cold_starts_epochs4", 4)):
        for n, found in sorted(state.get(key, {}).items(), key=lambda kv: int(kv[0])):
            out.append({"label": f"cold start N={n}, {epochs} epoch{'s' * (epochs > 1)}", "group": "P1",
                        "valid": found["valid"]})
    for suffix, n in (("", state.get("p1_choice")), ("_n320", 320)):
        for lr, found in sorted(state.get("p2_grpo" + suffix, {}).items(), key=lambda kv: -float(kv[0])):
            out.append({"label": f"GRPO lr {lr}, 40 steps (N={n})", "group": "P2", "valid": found["valid"],
                        "vs_cold": found["vs_cold"]})
        p3 = state.get("p3_opd" + suffix)
        if p3:
            out.append({"label": f"OPD lr {state['p2_choice' + suffix]:g}, 40 steps (N={n})", "group": "P3",
                        "valid": p3["valid"], "vs_cold": p3["vs_cold"], "gate": G2_GATE})
        d1 = state.get("d1_opd_150" + suffix)
        for step, found in sorted((d1 or {}).get("valid", {}).items(), key=lambda kv: int(kv[0])):
            out.append({"label": f"OPD lr {d1['lr']:g}, step {step} of 150 (N={n})", "group": "D1",
                        "valid": found["valid"], "vs_cold": found["vs_cold"]})
    return out


def markdown(state: dict, table: list[dict]) -> str:
    lines = ["# Grid 2's pilots (validation split)", "",
             "Every model below is scored on the same 200 `valid` tasks (temperature 0.4, eval seed 0, 15 turns);",
             "pilots are paired task by task with their own cold start (95% t interval over the 200 tasks).",
             "The plan and its rules: [PLAN.md](PLAN.md); the data: [pilots.json](pilots.json);",
             "made by `python benchmarks/grid2_report.py`.", "",
             "| pilot | model | valid success % [95%] | vs its cold start, points [95%] | gate |",
             "|---|---|---|---|---|"]
    for row in table:
        v = row["valid"]
        low, high = v["success_ci95"]
        diff = interval(row["vs_cold"]) if "vs_cold" in row else ""
        gate = ""
        if "gate" in row:
            gate = f"G2 >= +{100 * row['gate']:.0f}: " + ("passes" if row["vs_cold"]["mean"] >= row["gate"] else "fails")
        lines.append(f"| {row['group']} | {row['label']} | {pct(v['success'])} [{pct(low)}, {pct(high)}] | "
                     f"{diff} | {gate} |")
    g1 = state.get("g1_probe", {})
    if g1:
        lines += ["", f"Gate G1 (mean |lp_T - lp_S| >= 0.5 nats a token at step 0 of OPD): "
                      f"{g1['mean_abs_log_ratio_step0']:.2f} on the N=160 cold start "
                      f"({'passes' if g1['passes'] else 'fails'})."]
    lines += ["", "![pilots](pilots.png)", ""]
    return "\n".join(lines)


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"reference": "black", "P1": "tab:gray", "P2": "tab:red", "P3": "tab:blue", "D1": "tab:cyan"}
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(table) + 1.2))
    for i, row in enumerate(reversed(table)):
        v = row["valid"]
        low, high = v["success_ci95"]
        ax.errorbar(100 * v["success"], i, xerr=[[100 * (v["success"] - low)], [100 * (high - v["success"])]],
                    fmt="o", color=colors[row["group"]], capsize=3)
    ax.set_yticks(range(len(table)))
    ax.set_yticklabels([f"{r['group']}: {r['label']}" for r in reversed(table)], fontsize=8)
    ax.set_xlabel("success on 200 valid tasks (%), 95% interval")
    ax.set_title("Grid 2's pilots on the validation split (PLAN.md)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/grid2")
    args = ap.parse_args(argv)
    out = Path(args.out)
    state = json.loads((out / "pilots.json").read_text())
    table = rows(state)
    atomic_write_text(out / "pilots.md", markdown(state, table))
    plot(table, out / "pilots.png")
    print(f"written: {out / 'pilots.md'}, {out / 'pilots.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
