"""Why the comparison grid's claims hold or fail: what drives each run's update, step by step.

    python benchmarks/diagnose_grid.py [--runs benchmarks/results/runs] [--out benchmarks/results]

Reads what benchmarks/compare.py left in each run folder: metrics.jsonl (every step, the whole
batch) and samples/step_*.jsonl (the first `sample_episodes` episodes of every step, with every
token's student and teacher log-probs and every turn's T-DUR weight; samples stay out of git, so
this runs where the grid ran). Writes diagnosis.md, diagnosis.json and diagnosis.png:

- the share of sum_t |A_t| that comes from kappa * A^OPD rather than rho * A^GRPO (ATOD.md
  sections 1-3), per window of steps, recomputed from the samples with the trainer's own advantage
  functions: the size of the advantages, NOT which term drives the update (that needs the per-term
  gradient norms the trainer logs as grad_norm_opd / grad_norm_grpo);
- whether GRPO's groups are degenerate: the share of groups with no GRPO signal (every rollout
  failed, or every one succeeded), and the truncated and invalid turn rates;
- whether T-DUR's weight concentrates on the turns that matter: the mean turn weight on invalid
  vs. valid turns and on turns of failed vs. successful episodes;
- whether the late decline of the in-training curves is real: each run's best curve point
  against its final model on the same 50 tasks, paired, with a bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from atod_edge import io
from atod_edge.train.advantages import grpo_advantages

sys.path.insert(0, str(Path(__file__).resolve().parent))  # compare_report sits beside this file
import compare_report  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WINDOW = 12   # steps per row of the tables


def read_jsonl(path: Path) -> list[dict]:
    """The file's records (atod_edge.io.read_jsonl: a torn last line is skipped)."""
    return io.read_jsonl(path)[0]


def step_terms(episodes: list[dict], kappa: float, rho: float) -> dict:
    """The advantage terms of one step's sampled episodes: summed |kappa A^OPD| and |rho A^GRPO|
    over their response tokens, T-DUR weights by kind of turn, and the groups' GRPO signal."""
    rewards = torch.tensor([float(e["reward"]) for e in episodes])
    groups = torch.tensor([int(e["group"]) for e in episodes])
    grpo = grpo_advantages(rewards, groups).tolist()
    out = {"opd": 0.0, "grpo": 0.0, "tokens": 0, "w": {"invalid": [], "valid": [], "failed": [], "won": []}}
    for episode, a_grpo in zip(episodes, grpo):
        for turn in episode["turns"]:
            student, teacher = turn.get("student_logprobs") or [], turn.get("teacher_logprobs") or []
            weight = turn.get("weight")
            weight = 1.0 if weight is None else float(weight)
            n = len(student)
            if teacher and len(teacher) == n:
                gap = np.abs(np.asarray(teacher) - np.asarray(student))
                out["opd"] += abs(kappa) * weight * float(gap.sum())
            out["grpo"] += abs(rho * a_grpo) * n
            out["tokens"] += n
            if teacher:
                out["w"]["valid" if turn.get("valid") else "invalid"].append(weight)
                out["w"]["won" if episode.get("success") else "failed"].append(weight)
    by_group: dict[int, list[bool]] = {}
    for episode in episodes:
        by_group.setdefault(int(episode["group"]), []).append(bool(episode.get("success")))
    out["groups"] = len(by_group)
    out["all_fail"] = sum(not any(s) for s in by_group.values())
    out["all_won"] = sum(all(s) for s in by_group.values())
    return out


def diagnose_run(run: Path) -> dict | None:
    metrics_path = run / "metrics.jsonl"
    if not (run / "done.json").exists() or not metrics_path.exists():
        return None
    metrics = read_jsonl(metrics_path)
    training = {m["step"]: m for m in metrics if "kappa" in m}
    curve = [m for m in metrics if "eval_outcomes" in m]
    config = json.loads((run / "run.json").read_text())["config"]
    windows: list[dict] = []
    for start in range(0, max(training) + 1, WINDOW):
        steps = [s for s in range(start, start + WINDOW) if s in training]
        acc = {"opd": 0.0, "grpo": 0.0, "tokens": 0, "groups": 0, "all_fail": 0, "all_won": 0,
               "w": {"invalid": [], "valid": [], "failed": [], "won": []}}
        for step in steps:
            sample = run / "samples" / f"step_{step:06d}.jsonl"
            if not sample.exists():
                continue
            m = training[step]
            terms = step_terms(read_jsonl(sample), float(m["kappa"]), float(m["rho"]))
            for key in ("opd", "grpo", "tokens", "groups", "all_fail", "all_won"):
                acc[key] += terms[key]
            for key, values in terms["w"].items():
                acc["w"][key] += values
        total = acc["opd"] + acc["grpo"]
        mean = lambda key: float(np.mean([training[s][key] for s in steps])) if steps else float("nan")  # noqa: E731
        windows.append({
            "steps": [start, start + WINDOW - 1],
            "kappa": mean("kappa"), "rho": mean("rho"),
            "opd_share": acc["opd"] / total if total else float("nan"),
            "mean_abs_log_ratio": mean("mean_abs_log_ratio"),
            "no_signal_groups": (acc["all_fail"] + acc["all_won"]) / acc["groups"] if acc["groups"] else float("nan"),
            "all_fail_groups": acc["all_fail"] / acc["groups"] if acc["groups"] else float("nan"),
            "all_won_groups": acc["all_won"] / acc["groups"] if acc["groups"] else float("nan"),
            "success": mean("success"), "invalid_rate": mean("invalid_rate"),
            "truncated_rate": mean("truncated_rate"), "episode_len": mean("episode_len"),
            "weight": {k: (float(np.mean(v)) if v else None) for k, v in acc["w"].items()},
        })
    final = json.loads((run / "final_eval.json").read_text())["eval"]["episodes"]["success"]
    decline = None
    if curve:
        best = max(curve, key=lambda m: m["eval_success"])
        middle = curve[len(curve) // 2]          # fixed in advance for every run: no selection
        decline = {"best_step": best["step"], "middle_step": middle["step"],
                   **{f"{name}_{k}": v for name, point in (("best", best), ("middle", middle))
                      for k, v in paired(final, point["eval_outcomes"]).items()}}
    return {"run": run.name, "algo": config["algo"], "weights": config.get("weights"),
            "anneal": (config.get("schedule") or {}).get("anneal"), "lr": config.get("lr"),
            "windows": windows, "decline": decline,
            "steps": [{"step": s, "success": training[s]["success"], "truncated_rate": training[s]["truncated_rate"],
                       "invalid_rate": training[s]["invalid_rate"], "grad_norm": training[s].get("grad_norm")}
                      for s in sorted(training)]}


def paired(final: list[int], earlier: list[int]) -> dict:
    """The final model minus an earlier curve point on the curve's tasks (the first n of the
    final evaluation's), with compare_report's 95% bootstrap interval over tasks."""
    n = len(earlier)
    diff = np.asarray(final[:n], float) - np.asarray(earlier, float)
    stats = compare_report.paired_bootstrap([diff[None, :]])   # one env, one seed: a bootstrap over the tasks
    return {"earlier": float(np.mean(earlier)), "final": float(np.mean(final[:n])), "diff": stats["diff"],
            "ci95": stats["ci95"], "tasks": n}


def pct(x) -> str:
    return "—" if x is None or x != x else f"{100 * x:.0f}%"


def report(diagnoses: list[dict]) -> str:
    lines = ["# Diagnosis of the comparison grid's runs", "",
             "From each run's metrics.jsonl (whole batches) and its saved samples (the first 8 episodes of "
             "every step, 2 whole groups), by `python benchmarks/diagnose_grid.py`. Windows of "
             f"{WINDOW} steps.", "",
             "## Share of sum |A_t| (advantage size, not gradient) from kappa A^OPD (the rest is rho A^GRPO)", "",
             "Shares of advantage size do not say which term drives the update: a constant advantage on "
             "near-deterministic tokens has a small gradient. The per-term gradient norms "
             "(grad_norm_opd, grad_norm_grpo in metrics.jsonl) do.", "",
             "| run | " + " | ".join(f"steps {w['steps'][0]}-{w['steps'][1]}" for w in diagnoses[0]["windows"]) + " |",
             "|---|" + "---|" * len(diagnoses[0]["windows"])]
    for d in diagnoses:
        lines.append(f"| {d['run']} | " + " | ".join(f"{pct(w['opd_share'])} (κ {w['kappa']:.2f}, ρ {w['rho']:.2f})"
                                                      for w in d["windows"]) + " |")
    lines += ["", "## GRPO's groups: share with no signal (all failed / all succeeded), and turn rates", "",
              "| run | " + " | ".join(f"steps {w['steps'][0]}-{w['steps'][1]}" for w in diagnoses[0]["windows"]) + " |",
              "|---|" + "---|" * len(diagnoses[0]["windows"])]
    for d in diagnoses:
        lines.append(f"| {d['run']} | " + " | ".join(
            f"{pct(w['no_signal_groups'])} ({pct(w['all_fail_groups'])}/{pct(w['all_won_groups'])}); "
            f"success {pct(w['success'])}, invalid {pct(w['invalid_rate'])}, truncated {pct(w['truncated_rate'])}"
            for w in d["windows"]) + " |")
    lines += ["", "## T-DUR: mean turn weight by kind of turn (all steps)", "",
              "| run | invalid turns | valid turns | turns of failed episodes | turns of won episodes |",
              "|---|---|---|---|---|"]
    for d in diagnoses:
        if d["algo"] == "grpo":
            continue
        w = {k: [x["weight"][k] for x in d["windows"] if x["weight"][k] is not None] for k in
             ("invalid", "valid", "failed", "won")}
        lines.append(f"| {d['run']} | " + " | ".join(f"{np.mean(v):.3f}" if v else "—" for v in w.values()) + " |")
    lines += ["", "## The late decline: the final model vs. earlier in-training points, paired on the same 50 tasks", "",
              "| run | middle point (fixed) | final − middle, 95% interval | best point (picked after the fact) | "
              "final − best, 95% interval |", "|---|---|---|---|---|"]
    for d in diagnoses:
        x = d["decline"]
        if x:
            cells = []
            for name in ("middle", "best"):
                lo, hi = x[f"{name}_ci95"]
                cells += [f"step {x[f'{name}_step']}: {100 * x[f'{name}_earlier']:.0f}% "
                          f"(final {100 * x[f'{name}_final']:.0f}%)",
                          f"{100 * x[f'{name}_diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"]
            lines.append(f"| {d['run']} | " + " | ".join(cells) + " |")
    lines += ["", "The best point is the maximum of 5 noisy 50-episode points, so final − best is biased "
              "downwards (by about one standard error of a point, ~7 points here); the middle point is the same "
              "step for every run, chosen before looking.", ""]
    return "\n".join(lines)


def plot(diagnoses: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    methods: dict[str, list[dict]] = {}
    for d in diagnoses:                      # one line per method: the mean over its seeds
        methods.setdefault(d["run"].rsplit("-s", 1)[0], []).append(d)
    for method, runs in methods.items():
        mids = [np.mean(w["steps"]) for w in runs[0]["windows"]]
        style = {"atod": "-", "opd": "--", "grpo": ":"}[runs[0]["algo"]]
        label = f"{method} ({len(runs)} seeds)"
        for ax, key in ((axes[0], "opd_share"), (axes[1], "no_signal_groups")):
            if key == "opd_share" and runs[0]["algo"] == "grpo":
                continue
            ax.plot(mids, [np.mean([r["windows"][i][key] for r in runs]) for i in range(len(mids))], style,
                    marker="o", label=label)
    for d in diagnoses:
        if d["algo"] == "grpo":
            steps = d["steps"]
            axes[2].plot([s["step"] for s in steps], [s["truncated_rate"] for s in steps], label=f"{d['run']} truncated")
            axes[2].plot([s["step"] for s in steps], [s["success"] for s in steps], alpha=0.4, label=f"{d['run']} success")
    axes[0].set(title="share of |A| from κ·A^OPD", xlabel="step", ylim=(0, 1.02))
    axes[1].set(title="groups with no GRPO signal", xlabel="step", ylim=(0, 1.02))
    axes[2].set(title="GRPO runs: truncated turns and batch success", xlabel="step", ylim=(0, 1.02))
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from atod_edge.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(RESULTS / "runs"))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    runs = sorted(p for p in Path(args.runs).iterdir() if p.is_dir())
    diagnoses = [d for d in map(diagnose_run, runs) if d is not None]
    if not diagnoses:
        raise SystemExit(f"diagnose_grid: no finished runs in {args.runs}")
    out = Path(args.out)
    atomic_write_text(out / "diagnosis.json", json.dumps(diagnoses, indent=1) + "\n")
    text = report(diagnoses)
    atomic_write_text(out / "diagnosis.md", text)
    plot(diagnoses, out / "diagnosis.png")
    print(text)
    print(f"wrote {out / 'diagnosis.md'}, diagnosis.json, diagnosis.png")


if __name__ == "__main__":
    main()
