"""Tables, plots and the time breakdown of the method comparison (benchmarks/compare.py).

Everything here reads files that compare.py leaves under OUT and writes OUT/results.md,
OUT/results.json and the PNG plots; nothing trains or evaluates, so `--report-only` and the
tests run it alone. Layout it reads:

    OUT/runs/{env}-{method}-s{seed}/run.json         who the run is (env, method, seed, config)
    OUT/runs/{env}-{method}-s{seed}/metrics.jsonl    per-step rows and eval rows (the trainer's)
    OUT/runs/{env}-{method}-s{seed}/done.json        training finished (final checkpoint, wall time)
    OUT/runs/{env}-{method}-s{seed}/final_eval.json  {split: {"key", "summary", "episodes"}} of the final
                                                     model; episodes: per-task outcomes (task_id,
                                                     success, turns, invalid lists, task order)
    OUT/models/{env}/{teacher,cold-start}.json       {"path", split: {"key", "summary", "episodes"}}
    OUT/wall.json                                    wall seconds, summed over every invocation
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import seed_stats  # noqa: E402 - a sibling module (benchmarks/ is on sys.path for every caller)
from atod_edge.io import atomic_path, atomic_write_json, atomic_write_text, read_jsonl

SPLITS = ("eval", "unseen")   # the splits evaluated and reported; use_splits() narrows them (grid 2: eval)


def use_splits(splits) -> None:
    """Evaluate and report only `splits` (a subset of eval, unseen), e.g. grid 2 drops unseen,
    where the teacher scores 0% (benchmarks/results/grid2/PLAN.md)."""
    global SPLITS
    bad = [s for s in splits if s not in ("eval", "unseen")]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of eval, unseen; got {', '.join(splits) or 'none'}")
    SPLITS = tuple(splits)

PLOTS = ("success_vs_step.png", "kappa_rho.png", "turns_vs_step.png", "log_ratio_vs_step.png", "time_breakdown.png")
MAIN_METHODS = ("grpo", "opd", "atod")
# ablation name -> --set overrides on top of ATOD (ATOD.md section 8)
ABLATIONS = {"no-anneal": ["schedule.anneal=false"], "uniform": ["weights=uniform"], "token": ["weights=token"],
             "adaptive": ["schedule.shape=adaptive"]}
LABELS = {"cold-start": "cold-start student", "grpo": "GRPO", "opd": "OPD", "atod": "ATOD", "teacher": "teacher",
          "atod-no-anneal": "ATOD without annealing", "atod-uniform": "ATOD, uniform turn weights (no T-DUR)",
          "atod-token": "ATOD, token-level weights", "atod-adaptive": "ATOD, adaptive schedule"}
COLORS = {"cold-start": "tab:gray", "grpo": "tab:red", "opd": "tab:blue", "atod": "tab:green", "teacher": "black",
          "atod-no-anneal": "tab:olive", "atod-uniform": "tab:purple", "atod-token": "tab:brown",
          "atod-adaptive": "tab:cyan"}
# (key in a breakdown, label): where a training step's wall time goes
PHASES = [("generate", "generation"), ("env", "env stepping"), ("prompt", "prompt building"),
          ("rollout_other", "rollout bookkeeping"), ("teacher", "teacher scoring"), ("update", "update"),
          ("eval", "evaluation (curves)"), ("checkpoint", "checkpoint"), ("other", "other (startup, logging)")]


def run_name(env: str, method: str, seed: int) -> str:
    return f"{env}-{method}-s{seed}"


# --- reading runs ----------------------------------------------------------------------------

@dataclass
class RunRecord:
    """One training run as found on disk."""

    name: str
    env: str
    method: str
    seed: int
    steps: int
    train_rows: list[dict] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    done: dict | None = None
    final: dict = field(default_factory=dict)   # split -> eval summary of the final model
    outcomes: dict = field(default_factory=dict)  # split -> per-episode outcomes of the final model
    config: dict = field(default_factory=dict)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def load_run(run_dir: Path) -> RunRecord | None:
    info = _read_json(run_dir / "run.json")
    if not info:
        return None
    rows, _ = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else ([], 0)
    evals = _read_json(run_dir / "final_eval.json") or {}
    final = {split: entry["summary"] for split, entry in evals.items() if isinstance(entry, dict) and "summary" in entry}
    outcomes = {split: entry["episodes"] for split, entry in evals.items()
                if isinstance(entry, dict) and isinstance(entry.get("episodes"), dict)}
    return RunRecord(name=run_dir.name, env=info["env"], method=info["method"], seed=int(info["seed"]),
                     steps=int(info.get("config", {}).get("steps", 0)),
                     train_rows=[r for r in rows if "eval_success" not in r],
                     eval_rows=[r for r in rows if "eval_success" in r],
                     done=_read_json(run_dir / "done.json"), final=final, outcomes=outcomes,
                     config=info.get("config", {}))


def load_runs(out: Path) -> list[RunRecord]:
    runs = [load_run(p) for p in sorted((out / "runs").glob("*")) if p.is_dir()]
    return [r for r in runs if r is not None]


def load_model_outcomes(out: Path) -> dict[str, dict[str, dict]]:
    """env -> role -> split -> per-episode outcomes of the teacher and the cold start."""
    found: dict[str, dict[str, dict]] = {}
    for path in sorted((out / "models").glob("*/*.json")):
        data = _read_json(path) or {}
        for split in SPLITS:
            if isinstance(data.get(split), dict) and isinstance(data[split].get("episodes"), dict):
                found.setdefault(path.parent.name, {}).setdefault(path.stem, {})[split] = data[split]["episodes"]
    return found


def load_model_evals(out: Path) -> dict[str, dict[str, dict]]:
    """env -> role ("teacher" | "cold-start") -> split -> eval summary."""
    found: dict[str, dict[str, dict]] = {}
    for path in sorted((out / "models").glob("*/*.json")):
        data = _read_json(path) or {}
        summaries = {s: data[s]["summary"] for s in SPLITS if isinstance(data.get(s), dict) and "summary" in data[s]}
        if summaries:
            found.setdefault(path.parent.name, {})[path.stem] = summaries
    return found


# --- numbers ---------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def cell_stats(per_seed: dict) -> dict:
    values = [per_seed[k] for k in sorted(per_seed, key=str)]
    mean, std = mean_std(values)
    # "-" keys a model evaluated once (teacher, cold start): no seeds to count
    return {"mean": mean, "std": std, "n": len(values), "values": values, "single": set(per_seed) == {"-"}}


def average_over_envs(per_env: dict[str, dict], envs: list[str]) -> dict | None:
    """Mean ± std over seeds of each seed's average over the envs (seeds present in every env);
    None when some env has no value for this row."""
    if not envs or any(env not in per_env or not per_env[env] for env in envs):
        return None
    seeds = set.intersection(*(set(per_env[env]) for env in envs))
    if not seeds:
        return None
    return cell_stats({s: sum(per_env[env][s] for env in envs) / len(envs) for s in seeds})


def collect_table(runs: list[RunRecord], models: dict, envs: list[str], methods: list[str], split: str,
                  key: str = "success") -> dict[str, dict[str, dict]]:
    """row -> env -> {seed: value} for the final evaluation of every run plus the teacher and the
    cold-start student (one model each: one value, keyed "-")."""
    table: dict[str, dict[str, dict]] = {row: {} for row in ["cold-start", *methods, "teacher"]}
    for run in runs:
        if run.env in envs and run.method in methods and split in run.final:
            table[run.method].setdefault(run.env, {})[run.seed] = run.final[split][key]
    for env in envs:
        for role in ("cold-start", "teacher"):
            summary = models.get(env, {}).get(role, {}).get(split)
            if summary:
                table[role][env] = {"-": summary[key]}
    return table


def table_stats(table: dict[str, dict[str, dict]], envs: list[str]) -> dict[str, dict]:
    """row -> {env: stats, "average": stats} (stats: mean, std, n, values)."""
    stats = {}
    for row, per_env in table.items():
        stats[row] = {env: cell_stats(per_env[env]) for env in envs if per_env.get(env)}
        avg = average_over_envs(per_env, envs)
        if avg:
            stats[row]["average"] = avg
    return stats


def format_cell(stats: dict | None, percent: bool = True, seeds: int = 0) -> str:
    if not stats:
        return "—"
    scale = 100.0 if percent else 1.0
    text = f"{stats['mean'] * scale:.1f}"
    if stats["n"] > 1:
        text += f" ± {stats['std'] * scale:.1f}"
    if seeds and seeds != stats["n"] and not stats.get("single"):
        text += f" (n={stats['n']})"
    return text


def markdown_table(stats: dict[str, dict], envs: list[str], rows: list[str], percent: bool = True,
                   seeds: int = 0, average: bool = True) -> str:
    header = ["method", *envs, *(["average"] if average else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row not in stats:
            continue
        cells = [format_cell(stats[row].get(env), percent, seeds) for env in envs]
        if average:
            cells.append(format_cell(stats[row].get("average"), percent, seeds))
        lines.append(f"| {LABELS.get(row, row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_claim(a: dict | None, b: dict | None, claim: str, larger_is_better: bool = True) -> str:
    """One line: does mean(a) beat mean(b), and by more than two standard errors?"""
    if not a or not b:
        return f"- {claim}: not measured (missing runs)"
    diff = (a["mean"] - b["mean"]) * (1 if larger_is_better else -1)
    se = math.sqrt(a["std"] ** 2 / max(1, a["n"]) + b["std"] ** 2 / max(1, b["n"]))
    numbers = f"{a['mean'] * 100:.1f} vs {b['mean'] * 100:.1f}" if larger_is_better else \
        f"{a['mean']:.2f} vs {b['mean']:.2f}"
    if diff <= 0:
        verdict = "does not hold"
    elif se > 0 and diff <= 2 * se:
        verdict = "holds in the mean, within noise (< 2 standard errors)"
    else:
        verdict = "holds"
    return f"- {claim}: {verdict} ({numbers})"


# --- paired comparisons (the same tasks for every model) ------------------------------------

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
TRACKS_MARGIN = 0.05   # "ATOD tracks OPD early": not more than 5 points below it


def _values(outcomes: dict, key: str) -> list[float]:
    """Per-episode values of `key`; "turns_won" is the turn count of won episodes and NaN elsewhere
    (episodes end early when won, so turns compare only where both sides won)."""
    if key == "turns_won":
        return [float(t) if s else float("nan") for t, s in zip(outcomes["turns"], outcomes["success"])]
    return [float(v) for v in outcomes[key]]


def paired_differences(a: dict, b: dict, key: str = "success") -> tuple[np.ndarray, list] | None:
    """[seeds, tasks] of a - b per task, from per-episode outcomes (NaN where a side has no value:
    key "turns_won" on a lost episode).

    a, b: {seed: outcomes} (outcomes: {"task_id": [...], key: [...]}); a model evaluated once
    (teacher, cold start) is {"-": outcomes} and pairs with every seed of the other side. Seeds:
    those both sides have; tasks: the task ids both evaluations played, in a's order. None when
    nothing pairs."""
    if not a or not b:
        return None
    if set(a) == {"-"} and set(b) != {"-"}:
        flipped = paired_differences(b, a, key)
        return (-flipped[0], flipped[1]) if flipped else None
    seeds = sorted(set(a) & set(b), key=str) if set(b) != {"-"} else sorted(a, key=str)
    if not seeds:
        return None
    rows = []
    for seed in seeds:
        left, right = a[seed], b[seed if seed in b else "-"]
        right_by_task = dict(zip(right["task_id"], _values(right, key)))
        rows.append({task: value - right_by_task[task]
                     for task, value in zip(left["task_id"], _values(left, key)) if task in right_by_task})
    tasks = [t for t in rows[0] if all(t in row for row in rows)]
    if not tasks:
        return None
    matrix = np.array([[row[t] for t in tasks] for row in rows], dtype=np.float64)
    has_value = ~np.isnan(matrix).all(axis=1)   # turns_won: a seed whose model won no paired task says nothing
    if not has_value.any():
        return None
    return matrix[has_value], [seed for seed, keep in zip(seeds, has_value) if keep]


def paired_bootstrap(diffs: list[np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict:
    """The paired difference and its 95% percentile interval.

    diffs: one [seeds, tasks] array per env (a - b per task, paired by seed). The estimate is
    the mean over envs of the mean over seeds and tasks. Each resample draws task indices with
    replacement within each env, the same indices for every seed (a task stays paired across
    seeds), and averages over seeds: the interval covers which tasks were drawn and how their
    episodes went, not which training seeds ran (the per-seed values show that spread)."""
    rng = np.random.default_rng(seed)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # NaN (no value) cells are left out of every mean
        estimate = float(np.mean([np.nanmean(np.nanmean(d, axis=1)) for d in diffs]))   # mean of seeds' means
        boot = np.zeros(resamples)
        for d in diffs:
            per_task = np.nanmean(d, axis=0)
            per_task = per_task[~np.isnan(per_task)]
            boot += per_task[rng.integers(0, len(per_task), size=(resamples, len(per_task)))].mean(axis=1)
        boot /= len(diffs)
        low, high = np.percentile(boot, [2.5, 97.5])
        seeds = min(d.shape[0] for d in diffs)
        per_seed = [float(np.mean([np.nanmean(d[i]) for d in diffs])) for i in range(seeds)]
    return {"diff": estimate, "ci95": [float(low), float(high)], "per_seed": per_seed,
            "tasks": [int((~np.isnan(d)).any(axis=0).sum()) for d in diffs], "seeds": seeds,
            "resamples": resamples, "bootstrap_seed": seed}


def verdict(ci95: list[float], threshold: float = 0.0) -> str:
    """holds: the whole interval above the threshold; fails: the whole interval below it;
    inconclusive: the interval spans it."""
    low, high = ci95
    if low > threshold:
        return "holds"
    if high < threshold:
        return "fails"
    return "inconclusive"


@dataclass
class Claim:
    """One headline claim: positive `diff` means the claim's direction."""

    name: str
    split: str
    a: str                      # the row whose outcome comes first in the difference
    b: str
    key: str = "success"        # outcome compared: success (0/1), turns, or turns_won (turns where both won)
    sign: int = 1               # +1: a - b; -1: b - a (fewer turns is better)
    threshold: float = 0.0
    curve: bool = False         # in-training evaluations of the first anneal_steps, not the final one
    note: str = ""


def headline_claims(methods: list[str], ablations: list[str]) -> list[Claim]:
    """ATOD.md section 7's headline claims, on both splits."""
    claims = []
    for split in SPLITS:
        claims += [Claim("ATOD > OPD", split, "atod", "opd"), Claim("OPD > GRPO", split, "opd", "grpo"),
                   Claim("ATOD > GRPO", split, "atod", "grpo"),
                   Claim("ATOD >= teacher (the student passes its teacher)", split, "atod", "teacher")]
    claims.append(Claim("ATOD tracks OPD early", "eval", "atod", "opd", threshold=-TRACKS_MARGIN, curve=True,
                        note=f"in-training evaluations up to step anneal_steps; holds when ATOD is at most "
                             f"{TRACKS_MARGIN:.0%} below OPD"))
    won = "turns on episodes both sides won (won episodes end early, so all-episode turns mostly track success)"
    claims += [Claim("ATOD's won episodes are shorter than the cold start's", "eval", "atod", "cold-start",
                     key="turns_won", sign=-1, note=won),
               Claim("GRPO's won episodes are longer than the cold start's", "eval", "grpo", "cold-start",
                     key="turns_won", note=won),
               Claim("ATOD's won episodes are shorter than GRPO's", "eval", "atod", "grpo", key="turns_won", sign=-1,
                     note=won)]
    for split in SPLITS:
        if "no-anneal" in ablations:
            claims.append(Claim("annealing helps (ATOD > ATOD without annealing)", split, "atod", "atod-no-anneal"))
        if "uniform" in ablations:
            claims.append(Claim("T-DUR helps (ATOD > ATOD with uniform turn weights)", split, "atod", "atod-uniform"))
        if "token" in ablations:
            claims.append(Claim("turn-level beats token-level weights", split, "atod", "atod-token"))
        if "adaptive" in ablations:
            claims.append(Claim("the adaptive schedule differs from the linear one (two-sided: adaptive - linear)",
                                split, "atod-adaptive", "atod"))
    return [c for c in claims if all(r in ("teacher", "cold-start", *methods) or r.removeprefix("atod-") in ablations
                                     for r in (c.a, c.b))]


def outcomes_by_row(runs: list[RunRecord], model_outcomes: dict, env: str, row: str, split: str) -> dict:
    """{seed: outcomes} of a method's final evaluations, or {"-": outcomes} of the teacher / cold start."""
    if row in ("teacher", "cold-start"):
        found = model_outcomes.get(env, {}).get(row, {}).get(split)
        return {"-": found} if found else {}
    return {r.seed: r.outcomes[split] for r in runs if r.env == env and r.method == row and split in r.outcomes}


def curve_outcomes(runs: list[RunRecord], env: str, method: str) -> dict:
    """{seed: outcomes} over the in-training evaluations of a run's first anneal_steps steps:
    each (step, task) is one pseudo-task, so two runs pair on the same step and task."""
    found = {}
    for r in runs:
        if r.env != env or r.method != method:
            continue
        horizon = int(r.config.get("schedule", {}).get("anneal_steps") or r.steps)
        rows = [row for row in r.eval_rows if isinstance(row.get("eval_outcomes"), list)
                and int(row["step"]) + 1 <= horizon]
        if rows:
            found[r.seed] = {"task_id": [f"{row['step']}:{i}" for row in rows for i in range(len(row["eval_outcomes"]))],
                             "success": [v for row in rows for v in row["eval_outcomes"]]}
    return found


def evaluate_claims(claims: list[Claim], runs: list[RunRecord], model_outcomes: dict, envs: list[str]) -> list[dict]:
    results = []
    for claim in claims:
        claim_envs = ["household"] if claim.a.startswith("atod-") or claim.b.startswith("atod-") else envs
        diffs, missing, solved = [], [], False
        for env in claim_envs:
            if claim.curve:
                a, b = curve_outcomes(runs, env, claim.a), curve_outcomes(runs, env, claim.b)
            else:
                a = outcomes_by_row(runs, model_outcomes, env, claim.a, claim.split)
                b = outcomes_by_row(runs, model_outcomes, env, claim.b, claim.split)
            paired = paired_differences(a, b, claim.key)
            solved = solved or any(any(o.get("success", ())) for side in (a, b) for o in side.values())
            if paired is None:
                missing.append(env)
            else:
                diffs.append(claim.sign * paired[0])
        entry = {"claim": claim.name, "split": claim.split, "a": claim.a, "b": claim.b, "key": claim.key,
                 "threshold": claim.threshold, "envs": claim_envs, "note": claim.note,
                 "curve": claim.curve}
        if missing:
            entry.update(verdict="not measured", missing_envs=missing)
        else:
            entry.update(paired_bootstrap(diffs))
            entry["task_verdict"] = verdict(entry["ci95"], claim.threshold)
            # the paper's effect sizes are success points; on turns there is none to compare the MDE with
            entry.update(seed_stats.seed_level(diffs, claim.threshold, paper_effect=seed_stats.PAPER_EFFECT
                                               if claim.key == "success" else None))
            entry["verdict"] = entry["seed_verdict"] if solved else seed_stats.NO_SIGNAL
        results.append(entry)
    return results


def claim_line(entry: dict) -> str:
    where = "" if entry["curve"] else f" [{entry['split']}]"
    if entry["verdict"] == "not measured":
        return (f"- {entry['claim']}{where}: not measured (no paired per-episode outcomes for "
                f"{', '.join(entry['missing_envs'])})")
    scale, unit = (100.0, " points") if entry["key"] == "success" else (1.0, " turns")
    low, high = entry["ci95"]
    agree = sum(1 for v in entry["per_seed"] if v > entry["threshold"])
    seeds = ", ".join(f"{v * scale:+.1f}" for v in entry["per_seed"])
    if "seed_verdict" not in entry:     # a report rendered before seed-level inference existed
        return (f"- {entry['claim']}{where}: **{entry['verdict']}** — paired difference {entry['diff'] * scale:+.1f}"
                f"{unit}, 95% interval [{low * scale:+.1f}, {high * scale:+.1f}]; per seed {seeds} "
                f"({agree} of {len(entry['per_seed'])} above {entry['threshold'] * scale:+.0f}); "
                f"{sum(entry['tasks'])} paired tasks" + (f" ({entry['note']})" if entry["note"] else ""))
    seed_ci = entry["seed_ci95"]
    seed_part = (f"seed-level 95% t interval [{seed_ci[0] * scale:+.1f}, {seed_ci[1] * scale:+.1f}] over "
                 f"{entry['seeds_n']} seeds" if seed_ci else f"{entry['seeds_n']} seed (no seed-level interval)")
    hier = entry["hier_ci95"]
    mde = entry["mde80"]
    return (f"- {entry['claim']}{where}: **{entry['verdict']}** — paired difference {entry['diff'] * scale:+.1f}"
            f"{unit}; {seed_part}; seeds-then-tasks bootstrap [{hier[0] * scale:+.1f}, {hier[1] * scale:+.1f}]; "
            f"tasks-only bootstrap [{low * scale:+.1f}, {high * scale:+.1f}] ({entry['task_verdict']} at the task "
            f"level); smallest effect detectable at 80% power "
            + (f"{mde * scale:.1f}{unit}" if mde is not None else "n/a")
            + f"; per seed {seeds} ({agree} of {len(entry['per_seed'])} above {entry['threshold'] * scale:+.0f}); "
            f"{sum(entry['tasks'])} paired tasks" + (f" ({entry['note']})" if entry["note"] else ""))


# --- GRPO's signal and the invalid-action penalty (ATOD.md section 6) -----------------------

GRPO_KEYS = ("grpo_groups", "grpo_all_fail_groups", "grpo_penalty_only_groups", "grpo_all_fail_penalty_only_groups",
             "grpo_abs_adv", "grpo_abs_adv_all_fail", "grpo_abs_adv_all_fail_penalty_only")


def grpo_signal(runs: list[RunRecord], env: str, method: str) -> dict | None:
    """Over every step of every seed of (env, method): how often a group is all-fail, how much
    of the GRPO advantage (|A| summed over tokens) sits in all-fail groups, and how much of that
    only the invalid-action penalty creates; the penalty per episode beside the success reward."""
    group = [r for r in runs if r.env == env and r.method == method]
    rows = [row for r in group for row in r.train_rows if "time_rollout" in row]
    if not rows:
        return None
    penalty = float(group[0].config.get("invalid_penalty", 0.1))
    invalid_per_episode = sum(float(r.get("invalid_rate", 0)) * float(r.get("episode_len", 0)) for r in rows) / len(rows)
    out = {"runs": len(group), "steps": len(rows), "invalid_penalty": penalty,
           "invalid_turns_per_episode": invalid_per_episode, "penalty_per_episode": penalty * invalid_per_episode,
           "reward_per_episode": sum(float(r.get("reward", 0)) for r in rows) / len(rows),
           "success_rate": sum(float(r.get("success", 0)) for r in rows) / len(rows)}
    logged = [row for row in rows if all(k in row for k in GRPO_KEYS)]
    if not logged:
        out["logged"] = False
        return out
    total = {k: sum(float(row[k]) for row in logged) for k in GRPO_KEYS}

    def share(num: str, den: str) -> float | None:
        return total[num] / total[den] if total[den] else None

    out.update(logged=True, logged_steps=len(logged), totals=total,
               all_fail_group_share=share("grpo_all_fail_groups", "grpo_groups"),
               all_fail_penalty_only_share=share("grpo_all_fail_penalty_only_groups", "grpo_all_fail_groups"),
               abs_adv_share_all_fail=share("grpo_abs_adv_all_fail", "grpo_abs_adv"),
               abs_adv_all_fail_from_penalty=share("grpo_abs_adv_all_fail_penalty_only", "grpo_abs_adv_all_fail"))
    return out


def grpo_signal_md(signals: dict[str, dict]) -> str:
    def pct(value) -> str:
        return f"{value:.0%}" if value is not None else "—"

    lines = ["| run | invalid penalty / success reward | penalty per episode | reward per episode | "
             "all-fail groups | of them signal from the penalty alone | share of \\|A^GRPO\\| in all-fail groups | "
             "of it from the penalty alone |", "|" + "---|" * 8]
    for label, s in signals.items():
        cells = [f"{s['invalid_penalty']:.2f} / 1", f"{s['penalty_per_episode']:.3f} "
                 f"({s['invalid_turns_per_episode']:.1f} invalid turns)", f"{s['reward_per_episode']:.3f}"]
        if s.get("logged"):
            cells += [pct(s["all_fail_group_share"]), pct(s["all_fail_penalty_only_share"]),
                      pct(s["abs_adv_share_all_fail"]), pct(s["abs_adv_all_fail_from_penalty"])]
        else:
            cells += ["not logged"] * 4
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the paper's table -----------------------------------------------------------------------

def paper_table(runs: list[RunRecord], models: dict, envs: list[str], rows: list[str]) -> dict[str, dict]:
    """row -> column ("{env} {split}" and "average") -> stats, success of the final models. The
    average is, per seed, the mean over every env and split column (the seeds present in all)."""
    per_split = {split: collect_table(runs, models, envs, rows, split) for split in SPLITS}
    table = {}
    for row in rows:
        columns = {f"{env} {split}": per_split[split][row].get(env) for env in envs for split in SPLITS}
        stats = {col: cell_stats(values) for col, values in columns.items() if values}
        if len(stats) == len(columns):
            seeds = set.intersection(*(set(v) for v in columns.values()))
            if seeds:
                stats["average"] = cell_stats({s: sum(v[s] for v in columns.values()) / len(columns) for s in seeds})
        table[row] = stats
    return table


def paper_cell(stats: dict | None) -> str:
    if not stats:
        return "—"
    text = f"{stats['mean'] * 100:.1f}"
    if stats.get("single"):
        return text
    if stats["n"] > 1:
        text += f" ± {stats['std'] * 100:.1f}"
    return text + " (" + ", ".join(f"{v * 100:.1f}" for v in stats["values"]) + ")"


def paper_table_md(table: dict[str, dict], envs: list[str], rows: list[str]) -> str:
    columns = [f"{env} {split}" for env in envs for split in SPLITS] + ["average"]
    lines = ["| method | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        if table.get(row):
            lines.append(f"| {LABELS.get(row, row)} | " + " | ".join(paper_cell(table[row].get(c)) for c in columns) + " |")
    return "\n".join(lines)


# --- curves ----------------------------------------------------------------------------------

def curve_tasks(run: RunRecord) -> int | None:
    """How many tasks the run's in-training evaluations played (the first n of the eval split),
    when they kept their per-episode outcomes."""
    sizes = {len(r["eval_outcomes"]) for r in run.eval_rows if isinstance(r.get("eval_outcomes"), list)}
    return sizes.pop() if len(sizes) == 1 else None


def on_tasks(outcomes: dict | None, n: int | None) -> float | None:
    """Success over the first n tasks of an evaluation's per-episode outcomes (None without them)."""
    if not outcomes or not n or len(outcomes.get("success") or []) < n:
        return None
    return sum(outcomes["success"][:n]) / n


def success_curve(run: RunRecord, start: float | None, start_outcomes: dict | None = None) -> list[tuple[int, float]]:
    """(updates done, eval success): the cold start at 0, the in-training evals (smaller, see
    the budget note), the final evaluation at the last step. Where the in-training evals kept
    their outcomes, the cold start (given `start_outcomes`) and the final model are scored on the
    same first n tasks, so every point of the curve is on one task set (the first tasks of the
    split need not be as hard as all of them)."""
    n = curve_tasks(run)
    first = on_tasks(start_outcomes, n)
    start = first if first is not None else start
    points = [(0, start)] if start is not None else []
    points += [(int(r["step"]) + 1, float(r["eval_success"])) for r in run.eval_rows]
    if "eval" in run.final and run.done:
        last = on_tasks(run.outcomes.get("eval"), n)
        points.append((run.steps, last if last is not None else float(run.final["eval"]["success"])))
    return points


def train_curve(run: RunRecord, key: str) -> list[tuple[int, float]]:
    """(step, value) of a per-step training metric (rollouts at temperature 1.0 for step's policy)."""
    return [(int(r["step"]), float(r[key])) for r in run.train_rows if key in r]


def band(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """x, mean, min, max over the curves at each x where any curve has a value."""
    by_x: dict[int, list[float]] = {}
    for curve in curves:
        for x, y in curve:
            by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    return (xs, [sum(by_x[x]) / len(by_x[x]) for x in xs], [min(by_x[x]) for x in xs],
            [max(by_x[x]) for x in xs])


def saturation_step(xs: list[int], ys: list[float], fraction: float = 0.9) -> int | None:
    """First x where the curve has made `fraction` of its total rise (max - first value)."""
    if len(xs) < 2:
        return None
    rise = max(ys) - ys[0]
    if rise <= 0:
        return xs[0]
    return next(x for x, y in zip(xs, ys) if y - ys[0] >= fraction * rise)


# --- where the time goes ---------------------------------------------------------------------

def time_breakdown(train_rows: list[dict], eval_rows: list[dict], wall_s: float | None = None) -> dict | None:
    """Seconds per training step by phase, their shares, and throughputs, from metrics rows.

    Eval time is spread over the steps (it is paid once every eval_every steps). `wall_s` (the
    run's measured wall time, when it ran in one go) adds an "other" phase for what the rows do
    not time (model loading, sample records, logging). Teacher scoring and the update run one
    forward (and backward) pass over prompt + response tokens, so their tokens/s count both."""
    rows = [r for r in train_rows if "time_rollout" in r]
    if not rows:
        return None
    def total(key: str) -> float:
        return sum(float(r.get(key, 0.0)) for r in rows)

    seconds = {"generate": total("time_rollout_generate"), "env": total("time_rollout_env"),
               "prompt": total("time_rollout_prompt"), "teacher": total("time_teacher"),
               "update": total("time_update"), "checkpoint": total("time_checkpoint"),
               "eval": sum(float(r.get("time_eval", 0.0)) for r in eval_rows)}
    seconds["rollout_other"] = max(0.0, total("time_rollout") - seconds["generate"] - seconds["env"]
                                   - seconds["prompt"])
    measured = sum(seconds.values())
    seconds["other"] = max(0.0, wall_s - measured) if wall_s else 0.0
    wall = sum(seconds.values())
    n = len(rows)
    generated, prompt = total("generated_tokens"), total("prompt_tokens")
    def rate(tokens: float, secs: float) -> float | None:
        # under a millisecond a step is a phase that did not run (GRPO has no teacher), not a rate
        return tokens / secs if secs > 1e-3 * n and tokens > 0 else None

    return {
        "steps": n,
        "seconds_per_step": {k: v / n for k, v in seconds.items()},
        "share": {k: (v / wall if wall else 0.0) for k, v in seconds.items()},
        "step_seconds": wall / n,
        "tokens_per_s": {"generation": rate(generated, seconds["generate"]),
                         "teacher_scoring": rate(generated + prompt, seconds["teacher"]),
                         "update": rate(generated + prompt, seconds["update"])},
        "generated_tokens_per_step": generated / n, "prompt_tokens_per_step": prompt / n,
    }


def merge_breakdowns(items: list[dict]) -> dict | None:
    """Mean over runs (seeds) of seconds per step and tokens/s; shares recomputed from the means."""
    items = [b for b in items if b]
    if not items:
        return None
    per_step = {k: sum(b["seconds_per_step"][k] for b in items) / len(items) for k, _ in PHASES}
    wall = sum(per_step.values())
    rates = {}
    for key in items[0]["tokens_per_s"]:
        values = [b["tokens_per_s"][key] for b in items if b["tokens_per_s"].get(key)]
        rates[key] = sum(values) / len(values) if values else None
    return {"runs": len(items), "seconds_per_step": per_step, "step_seconds": wall,
            "share": {k: (v / wall if wall else 0.0) for k, v in per_step.items()}, "tokens_per_s": rates,
            "generated_tokens_per_step": sum(b["generated_tokens_per_step"] for b in items) / len(items)}


def breakdown_table(groups: dict[str, dict]) -> str:
    """groups: label -> merged breakdown."""
    header = ["run", "s/step", "peak RSS MB", *[label for _, label in PHASES], "gen tok/s", "teacher tok/s", "update tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, b in groups.items():
        rates = [f"{b['tokens_per_s'][k]:,.0f}" if b["tokens_per_s"].get(k) else "—"
                 for k in ("generation", "teacher_scoring", "update")]
        peak = f"{b['peak_rss_mb']:,.0f}" if b.get("peak_rss_mb") else "—"
        lines.append(f"| {label} | {b['step_seconds']:.1f} | {peak} | "
                     + " | ".join(f"{b['share'][k]:.0%}" for k, _ in PHASES)
                     + " | " + " | ".join(rates) + " |")
    return "\n".join(lines)


def run_breakdown(run: RunRecord) -> dict | None:
    # a resumed run's wall time covers only its last piece: leave "other" out rather than guess
    wall = run.done.get("wall_s") if run.done and not run.done.get("resumed_from_step") else None
    return time_breakdown(run.train_rows, run.eval_rows, wall)


# --- plots -----------------------------------------------------------------------------------

def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_band(ax, curves, method, linestyle="-"):
    curves = [c for c in curves if c]
    if not curves:
        return
    xs, mean, low, high = band(curves)
    color = COLORS.get(method)
    ax.plot(xs, mean, linestyle, color=color, marker="o" if len(xs) < 30 else None, markersize=3,
            label=f"{LABELS.get(method, method)} (n={len(curves)})")
    if len(curves) > 1:
        ax.fill_between(xs, low, high, color=color, alpha=0.15)


def plot_success(runs, models, envs, methods, path: Path, model_outcomes: dict | None = None) -> None:
    """Success vs step per method (mean and min-max band over seeds), the teacher as a line; with
    `model_outcomes`, the cold start, the final points and the teacher on the curves' tasks."""
    plt = _pyplot()
    model_outcomes = model_outcomes or {}
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        start = models.get(env, {}).get("cold-start", {}).get("eval", {}).get("success")
        cold = model_outcomes.get(env, {}).get("cold-start", {}).get("eval")
        env_runs = [r for r in runs if r.env == env]
        for method in methods:
            curves = [success_curve(r, start, cold) for r in env_runs if r.method == method]
            _draw_band(ax, curves, method, "--" if method not in MAIN_METHODS else "-")
        teacher = models.get(env, {}).get("teacher", {}).get("eval")
        n = next((curve_tasks(r) for r in env_runs if curve_tasks(r)), None)
        on_curve = on_tasks(model_outcomes.get(env, {}).get("teacher", {}).get("eval"), n)
        if on_curve is not None:
            ax.axhline(on_curve, color="black", linestyle=":", label=f"teacher (the curves' {n} tasks)")
        elif teacher:
            ax.axhline(teacher["success"], color="black", linestyle=":", label="teacher")
        ax.set_title(f"{env}: eval success")
        ax.set_xlabel("training step")
        ax.set_ylabel("success (mean; band: min-max over seeds)", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_kappa_rho(runs, envs, methods, path: Path) -> None:
    """Rows: kappa and rho (the schedule), the mean OPD (T-DUR) weight; one column per env."""
    plt = _pyplot()
    panels = [("kappa", "kappa (solid) and rho (dashed)"), ("mean_turn_weight", "mean OPD weight")]
    fig, axes = plt.subplots(len(panels), len(envs), figsize=(5 * len(envs), 3 * len(panels)), squeeze=False)
    for col, env in enumerate(envs):
        for row, (key, title) in enumerate(panels):
            ax = axes[row][col]
            for method in methods:
                if method == "grpo" and key != "kappa":
                    continue  # GRPO runs score no teacher: their lp_T columns are lp_S, not data
                group = [r for r in runs if r.env == env and r.method == method]
                _draw_band(ax, [train_curve(r, key) for r in group], method)
                if key == "kappa":
                    rho = [train_curve(r, "rho") for r in group]
                    if any(rho):
                        xs, mean, _, _ = band([c for c in rho if c])
                        ax.plot(xs, mean, "--", color=COLORS.get(method))
            ax.set_title(f"{env}: {title}", fontsize=9)
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_log_ratio(runs, envs, methods, path: Path) -> None:
    """Mean |lp_T - lp_S| per step: the trainer's mean_abs_log_ratio, the mean over the step's
    trained response tokens of |teacher log-prob - student (rollout) log-prob| of the sampled
    token. GRPO scores no teacher (its column is 0 by construction): left out."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for method in methods:
            if method == "grpo":
                continue
            curves = [train_curve(r, "mean_abs_log_ratio") for r in runs if r.env == env and r.method == method]
            _draw_band(ax, curves, method, "--" if method not in MAIN_METHODS else "-")
        ax.set_title(f"{env}: mean |lp_T - lp_S| per token")
        ax.set_ylabel("nats (training rollouts; band: min-max over seeds)", fontsize=8)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:   # nothing to draw before a teacher-scored run has rows
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_turns(runs, models, envs, methods, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for method in methods:
            curves = [train_curve(r, "episode_len") for r in runs if r.env == env and r.method == method]
            _draw_band(ax, curves, method, "--" if method not in MAIN_METHODS else "-")
        teacher = models.get(env, {}).get("teacher", {}).get("eval")
        if teacher:
            ax.axhline(teacher["turns"], color="black", linestyle=":", label="teacher (eval, T=0.4)")
        ax.set_title(f"{env}: turns per episode")
        ax.set_ylabel("training rollouts (mean; band: min-max over seeds)", fontsize=8)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_time(groups: dict[str, dict], path: Path) -> None:
    plt = _pyplot()
    labels = list(groups)
    fig, ax = plt.subplots(figsize=(12, max(3.0, 0.45 * len(labels) + 1.5)))
    left = [0.0] * len(labels)
    cmap = plt.get_cmap("tab10")
    for i, (key, label) in enumerate(PHASES):
        widths = [groups[g]["seconds_per_step"][key] for g in labels]
        ax.barh(labels, widths, left=left, color=cmap(i), label=label)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds per training step (mean over seeds)")
    ax.set_title("where the time goes")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    _save(fig, path)


# --- the report ------------------------------------------------------------------------------

def build_report(out: str | Path, envs: list[str], algos: list[str], seeds: list[int], ablations: list[str],
                 settings: dict | None = None, machine: dict | None = None, budget_note: str = "",
                 plots: bool = True) -> dict:
    """Write OUT/results.md, OUT/results.json and the plots from what is on disk; return the JSON."""
    out = Path(out)
    settings = settings or {}
    methods = [m for m in MAIN_METHODS if m in algos]
    ablation_methods = [f"atod-{a}" for a in ablations]
    all_runs = load_runs(out)
    runs = [r for r in all_runs if r.seed in seeds and r.env in envs]
    models = load_model_evals(out)
    model_outcomes = load_model_outcomes(out)
    paper_rows = ["cold-start", *[m for m in ("grpo", "opd", "atod") if m in methods],
                  *(ablation_methods if "household" in envs else []), "teacher"]
    paper_envs = envs
    paper = paper_table(runs, models, paper_envs, paper_rows)
    claims = evaluate_claims(headline_claims(methods, ablations if "household" in envs else []), runs,
                             model_outcomes, envs)
    signals = {}
    for env in envs:
        for method in [m for m in ("grpo", "atod") if m in methods] + (ablation_methods if env == "household" else []):
            found = grpo_signal(runs, env, method)
            if found:
                signals[f"{env} {LABELS.get(method, method)}"] = found

    tables, stats = {}, {}
    for split in SPLITS:
        stats[split] = table_stats(collect_table(runs, models, envs, methods, split), envs)
        tables[split] = markdown_table(stats[split], envs, ["cold-start", *methods, "teacher"], seeds=len(seeds))
    turns_stats = table_stats(collect_table(runs, models, envs, methods, "eval", key="turns"), envs)
    turns_table = markdown_table(turns_stats, envs, ["cold-start", *methods, "teacher"], percent=False,
                                 seeds=len(seeds))
    ablation_stats = {}
    ablation_md = ""
    if ablation_methods and "household" in envs:
        abl_rows = [m for m in ("opd", "atod") if m in methods] + ablation_methods
        for split in SPLITS:
            ablation_stats[split] = table_stats(collect_table(runs, models, ["household"], abl_rows, split),
                                                ["household"])
        ablation_stats["turns"] = table_stats(collect_table(runs, models, ["household"], abl_rows, "eval",
                                                            key="turns"), ["household"])
        ablation_md = _ablation_table(ablation_stats, ["cold-start", *abl_rows, "teacher"], len(seeds))

    per_run = {}
    groups: dict[str, dict] = {}
    for env in envs:
        for method in methods + (ablation_methods if env == "household" else []):
            group = [r for r in runs if r.env == env and r.method == method]
            merged = merge_breakdowns([run_breakdown(r) for r in group])
            if merged:
                peaks = [r.done["peak_rss_mb"] for r in group if r.done and r.done.get("peak_rss_mb")]
                merged["peak_rss_mb"] = max(peaks) if peaks else None
                groups[f"{env} {LABELS.get(method, method)}"] = merged
    for r in all_runs:
        per_run[r.name] = {"env": r.env, "method": r.method, "seed": r.seed, "steps": r.steps,
                           "finished": bool(r.done), "steps_done": len(r.train_rows), "final": r.final,
                           "done": r.done, "curve": success_curve(r, None), "time": run_breakdown(r)}

    saturation = {}
    for env in envs:
        start = models.get(env, {}).get("cold-start", {}).get("eval", {}).get("success")
        cold = model_outcomes.get(env, {}).get("cold-start", {}).get("eval")
        curves = [success_curve(r, start, cold) for r in runs if r.env == env and r.method == "opd" and r.done]
        if curves:
            xs, mean, _, _ = band(curves)
            saturation[env] = {"step_90pct_of_rise": saturation_step(xs, mean), "steps": max(xs),
                               "curve_mean": list(zip(xs, mean))}

    wall = (_read_json(out / "wall.json") or {}).get("seconds")
    results = {"settings": {**settings, "envs": envs, "algos": algos, "seeds": seeds, "ablations": ablations},
               "machine": machine or {}, "machine_invocations": (_read_json(out / "machine.json") or {}).get(
                   "invocations", []), "wall_s_total": wall, "models": models,
               "paper_table": {"rows": paper_rows, "columns": [f"{e} {s}" for e in paper_envs for s in SPLITS]
                               + ["average"], "cells": paper},
               "claims": claims, "grpo_signal": signals,
               "tables": {"success": stats, "turns": turns_stats, "ablations": ablation_stats},
               "time_breakdown": groups, "opd_saturation": saturation, "runs": per_run}

    md = _markdown(out, results, tables, turns_table, ablation_md, groups, envs, seeds, budget_note, stats,
                   paper_table_md(paper, paper_envs, paper_rows), grpo_signal_md(signals) if signals else "")
    if plots and runs:
        plot_methods = methods + ablation_methods
        plot_success(runs, models, envs, plot_methods, out / "success_vs_step.png", model_outcomes)
        plot_kappa_rho(runs, envs, plot_methods, out / "kappa_rho.png")
        plot_log_ratio(runs, envs, plot_methods, out / "log_ratio_vs_step.png")
        plot_turns(runs, models, envs, plot_methods, out / "turns_vs_step.png")
        if groups:
            plot_time(groups, out / "time_breakdown.png")
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", md)
    return results


def _ablation_table(stats: dict, rows: list[str], seeds: int) -> str:
    columns = [(s, True) for s in SPLITS] + [("turns", False)]
    lines = ["| household | " + " | ".join(f"{s} success" for s in SPLITS) + " | turns (eval) |",
             "|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [format_cell(stats[s].get(row, {}).get("household"), percent, seeds) for s, percent in columns]
        if any(c != "—" for c in cells):
            lines.append(f"| {LABELS.get(row, row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(out, results, tables, turns_table, ablation_md, groups, envs, seeds, budget_note, stats,
              paper_md="", signal_md="") -> str:
    s = results["settings"]
    m = results["machine"]
    runs = results["runs"]
    expected = s.get("expected_runs")
    finished = sum(1 for r in runs.values() if r["finished"] and r["env"] in envs and r["seed"] in seeds)
    wall = results["wall_s_total"]
    parts = [
        "# ATOD vs. OPD vs. GRPO on atod-edge's built-in environments", "",
        f"Success rate in %, final models, {s.get('eval_episodes', '?')} episodes per split at temperature "
        f"{s.get('eval_temperature', 0.4)}; trained runs: mean ± sample std over seeds {seeds}; the "
        "cold-start student and the teacher are one model each (one evaluation, no ±). "
        f"Runs finished: {finished}" + (f" of {expected}" if expected else "") + ".", "",
        "## Success rate (%): mean ± std over seeds (per-seed values)", "", paper_md, "",
        "## The paper's claims (ATOD.md section 7), paired over tasks and seeds", "",
        ("Every final evaluation plays the same tasks with the same sampling seed; a difference is "
         "taken per task and seed (seed s of one method against seed s of the other; the teacher and "
         "the cold start are one model, paired with every seed), averaged over seeds and tasks. 95% "
         f"interval: {BOOTSTRAP_RESAMPLES:,} bootstrap resamples of the tasks (numpy seed {BOOTSTRAP_SEED}), the "
         "same tasks for every seed: it does not resample training seeds. The verdict is taken at the "
         "seed level (benchmarks/seed_stats.py): the mean of the per-seed paired differences with its 95% "
         "Student-t interval over seeds; holds when that interval is above the threshold (0 unless said), "
         "fails when it is below; when it spans it, 'not testable with this design' if the smallest effect "
         "the seeds can detect at 80% power (two-sided alpha 0.05, from the observed seed spread) exceeds "
         f"the paper's smallest reported effect ({seed_stats.PAPER_EFFECT * 100:.0f} points), else inconclusive. "
         "A seeds-then-tasks (hierarchical) bootstrap interval is shown beside it, and the tasks-only "
         "interval with its own verdict for comparison."), "",
        *[claim_line(c) for c in results["claims"]], "",
        "## Eval split", "", tables["eval"], "",
        "## Unseen split", "", tables["unseen"], "",
        "## Mean turns per episode (eval split; lower is better when success is equal)", "", turns_table, "",
    ]
    if ablation_md:
        parts += ["## Ablations (household)", "", ablation_md, ""]
    parts += ["## Claims from the means only (no pairing; for comparison)", "", *_claims(results, stats), ""]
    if signal_md:
        parts += ["## GRPO's signal and the invalid-action penalty (ATOD.md section 6)", "", signal_md, "",
                  ("Over every training step of every seed. Rewards: success 1, failure 0, minus the penalty per "
                   "invalid turn. A group (the rollouts of one task) is all-fail when none succeeded; its GRPO "
                   "advantage is then nonzero only through the penalty ('signal from the penalty alone': the "
                   "env rewards are equal, the penalised ones are not), and std normalisation makes those "
                   "differences ±1-sized. \\|A^GRPO\\| is summed over the trained tokens (what a token-mean update "
                   "sees), before rho."), ""]
    parts += ["## Budget", ""]
    steps = s.get("steps")
    parts.append(f"- Steps: {steps} per run, {s.get('tasks_per_step', '?')} tasks x {s.get('group_size', '?')} "
                 f"rollouts per step, the same for every method and seed.")
    if budget_note:
        parts.append(f"- Why this budget: {budget_note}")
    for env, sat in results["opd_saturation"].items():
        parts.append(f"- {env}: OPD's mean eval-success curve made 90% of its rise by step "
                     f"{sat['step_90pct_of_rise']} of {sat['steps']}.")
    curve, final = s.get("curve_episodes", "?"), s.get("eval_episodes", "?")
    noisier = (f" (fewer than the final {final}, so the curve points are noisier than the table)"
               if isinstance(curve, int) and isinstance(final, int) and curve < final else "")
    parts.append(f"- Curves: in-training evaluation every {s.get('eval_every', '?')} steps on {curve} eval-split "
                 f"episodes{noisier}; step 0 is the cold-start student's evaluation and the last point each "
                 "run's final evaluation, both scored on the curves' tasks (the first of the final evaluation's "
                 "tasks, same seed), as is the teacher's line. Turns and kappa/rho curves are the training "
                 "rollouts of every step (temperature 1.0).")
    if m:
        parts.append(f"- Machine: {m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, torch "
                     f"{m.get('torch', '?')} with {m.get('torch_threads', '?')} threads"
                     + (f", {m['processor']}" if m.get("processor") else "")
                     + (f"; load average {m['load_average_at_start'][0]:.1f} when it started (a shared machine "
                        "slows every phase)" if m.get("load_average_at_start") else "") + ".")
    if len(results["machine_invocations"]) > 1:
        parts.append(f"- The benchmark ran in {len(results['machine_invocations'])} invocations (resumed).")
    if wall:
        parts.append(f"- Wall time, all invocations together: {wall / 3600:.2f} h ({wall:,.0f} s).")
    parts += ["", "Plots: success_vs_step.png, kappa_rho.png, turns_vs_step.png, log_ratio_vs_step.png, "
                  "time_breakdown.png.", ""]
    if groups:
        parts += ["## Where the time goes (share of a training step's wall time, mean over seeds)", "",
                  breakdown_table(groups), "",
                  ("Generation tokens/s counts generated tokens; teacher scoring and update count prompt + "
                  "response tokens (one forward, or forward + backward, over each turn). Evaluation is the "
                  "in-training curve evaluation spread over the steps; the final evaluations are not in it. "
                  "'other' is the run's wall time that no row timed (model loading, sample records), only "
                  "for runs that ran in one go. Peak RSS: the largest resident set of the process during a "
                  "run (its training, with student, teacher and optimizer state), the max over seeds."), ""]
    return "\n".join(parts)


def _claims(results: dict, stats: dict) -> list[str]:
    def avg(row: str) -> dict | None:
        return stats["eval"].get(row, {}).get("average")

    turns = results["tables"]["turns"]
    lines = [compare_claim(avg("atod"), avg("opd"), "ATOD > OPD"),
             compare_claim(avg("opd"), avg("grpo"), "OPD > GRPO"),
             compare_claim(avg("atod"), avg("teacher"), "the ATOD student passes its teacher"),
             compare_claim(turns.get("atod", {}).get("average"), turns.get("cold-start", {}).get("average"),
                           "ATOD's episodes are shorter than the cold start's (turns)", larger_is_better=False),
             compare_claim(turns.get("atod", {}).get("average"), turns.get("grpo", {}).get("average"),
                           "ATOD's episodes are shorter than GRPO's (turns)", larger_is_better=False)]
    abl = results["tables"].get("ablations", {}).get("eval", {})
    if abl.get("atod-no-anneal"):
        lines.append(compare_claim(abl.get("atod", {}).get("household"), abl["atod-no-anneal"].get("household"),
                                   "annealing helps (household: ATOD > ATOD without annealing)"))
    return lines
