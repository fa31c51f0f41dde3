"""Evaluation: run N episodes of any policy on an env split, summarise them, write a report.

The same code serves a training checkpoint, an ONNX or GGUF export, and the scripted policies.
Two policies evaluated with one config play the same tasks with the same sampling seeds;
`pair_episodes` and `compare_summary` pair their episodes task by task (wins, losses, ties and
the paired difference with its 95% interval), and `save_comparison` writes both episode files
plus the pairing index that `atod-edge tui --diff` reads.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from atod_edge.config import MAX_NEW_TOKENS, SEED_MAX, opt
from atod_edge.rollout.episode import Episode, write_episodes
from atod_edge.io import atomic_path, atomic_write_json

PAIRS_FILE = "pairs.json"
PAIRS_SCHEMA_VERSION = 1


@dataclass
class EvalConfig:
    env: str = opt("household", "environment name or import path pkg.module:Class")
    split: str = opt("eval", "task split", choices=["train", "valid", "eval", "unseen"])
    episodes: int = opt(100, "number of episodes", min=1)
    start: int = opt(0, "index of the first task in the split", min=0)
    temperature: float = opt(0.4, "sampling temperature (0 = greedy); the paper evaluates at 0.4", min=0.0)
    top_p: float = opt(1.0, "nucleus sampling threshold", min=0.0, max=1.0)
    max_new_tokens: int = opt(48, "max response tokens per turn", min=1, max=MAX_NEW_TOKENS)
    history_turns: int = opt(2, "past turns shown in the prompt", min=0)
    max_turns: int = opt(0, "turn limit per episode (0: the env's default)", min=0)
    batch_episodes: int = opt(64, "episodes rolled out concurrently", min=1)
    seed: int = opt(0, "sampling seed", min=0, max=SEED_MAX)
    device: str = opt("cpu", "torch device for PyTorch policies (cpu, cuda, cuda:1)")
    precision: str = opt("auto", "weights of a PyTorch model agent: auto (fp32 on CPU, the checkpoint's dtype "
                         "elsewhere) | bf16 (decodes about 2x faster on CPUs with native bf16; samples differ "
                         "from fp32's by rounding) | fp32", choices=["auto", "bf16", "fp32"])
    chat_template_kwargs: dict = opt({}, "extra keyword arguments of the chat template, e.g. {enable_thinking: "
                                     "false} for Qwen3 (as the model was trained)")
    env_step_timeout: float = opt(60.0, "seconds an env's reset/step may take before its episode ends as an "
                                  "error (0: no limit)", min=0.0)
    max_prompt_tokens: int = opt(0, "prompt token budget (0: the model's context less max_new_tokens); longer "
                                 "prompts are cut, oldest history first", min=0)

    def validate(self) -> None:
        from atod_edge.prompts import check_template_kwargs

        check_template_kwargs(self.chat_template_kwargs)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a success rate."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(episodes: Sequence[Episode], seconds: float | None = None) -> dict:
    from atod_edge.rollout.runner import env_errors

    n = len(episodes)
    wins = sum(ep.success for ep in episodes)
    turns = sum(ep.num_turns for ep in episodes)
    invalid = sum(ep.num_invalid for ep in episodes)
    tokens = sum(len(t.response_ids or []) for ep in episodes for t in ep.turns)
    low, high = wilson_interval(wins, n)
    summary = {
        "episodes": n,
        "success": wins / n if n else 0.0,
        "success_ci95": [low, high],
        "score": sum(ep.score for ep in episodes) / n if n else 0.0,
        "turns": turns / n if n else 0.0,
        "invalid_rate": invalid / turns if turns else 0.0,
        # responses cut at max_new_tokens (Turn.finish_reason "length"), as a share of all turns
        "truncated_rate": sum(ep.num_truncated for ep in episodes) / turns if turns else 0.0,
        # episodes ended by an env error (it raised, hung past env_step_timeout, its expert failed)
        "errors": env_errors(episodes),
        "generated_tokens": tokens,
    }
    first_error = next((ep.meta["error"] for ep in episodes if "error" in ep.meta), None)
    if first_error is not None:
        summary["first_error"] = " ".join(str(first_error).split())[:300]
    cuts = sum(int(ep.meta.get("prompt_cuts", 0) or 0) for ep in episodes)
    if cuts:
        summary["prompt_cuts"] = cuts     # turns whose prompt was cut to fit the context (rollout.budget)
    if seconds:
        summary["seconds"] = seconds
        summary["episodes_per_s"] = n / seconds
        summary["tokens_per_s"] = tokens / seconds
    return summary


def evaluate(policy, cfg: EvalConfig, progress: Callable[[int, int], None] | None = None,
             label_expert: bool = False) -> tuple[dict, list[Episode]]:
    """`policy` is a Policy (token-level) or one of "expert", "random". label_expert: record the
    scripted expert's action on every turn of a token-level policy (DAgger demos)."""
    from atod_edge.envs import env_class, env_tasks
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.rollout.runner import run_episodes, run_scripted

    env_cls = env_class(cfg.env)
    tasks = env_tasks(env_cls, cfg.split, cfg.episodes, start=cfg.start)   # a raising env: one line
    timeout = cfg.env_step_timeout or None
    started = time.perf_counter()
    episodes: list[Episode] = []
    if isinstance(policy, str):
        episodes = run_scripted(policy, env_cls, tasks, seed=cfg.seed, max_turns=cfg.max_turns or None,
                                env_step_timeout=timeout)
    else:
        sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  top_p=cfg.top_p)
        for start in range(0, len(tasks), cfg.batch_episodes):
            chunk = tasks[start:start + cfg.batch_episodes]
            episodes += run_episodes(policy, env_cls, chunk, sampling=sampling,
                                     seed=cfg.seed + start, history_turns=cfg.history_turns,
                                     max_turns=cfg.max_turns or None, label_expert=label_expert,
                                     chat_template_kwargs=cfg.chat_template_kwargs, env_step_timeout=timeout,
                                     max_prompt_tokens=cfg.max_prompt_tokens or None)
            if progress:
                progress(len(episodes), len(tasks))
    summary = summarize(episodes, time.perf_counter() - started)
    summary.update(env=cfg.env, split=cfg.split,
                   policy=policy if isinstance(policy, str) else policy.name)
    return summary, episodes


def save_eval(out_dir: str | Path, summary: dict, episodes: Sequence[Episode], force: bool = False) -> Path:
    """report.json and episodes.jsonl in `out_dir`, written in a new directory beside it and renamed
    onto it once both are complete: an earlier evaluation there stays whole until then (a full
    disk leaves it as it was). `out_dir` must be new, empty or an earlier evaluation
    (io.check_output's rule; force: a foreign directory is replaced too)."""
    out = Path(out_dir)
    with atomic_path(out, kind=None if force else "eval") as tmp:
        tmp.mkdir(parents=True)
        write_episodes(tmp / "episodes.jsonl", episodes)
        atomic_write_json(tmp / "report.json", summary)
    return out


def format_summary(summary: dict) -> str:
    low, high = summary["success_ci95"]
    line = (f"{summary.get('policy', '')} on {summary.get('env', '')}/{summary.get('split', '')}: "
            f"success {summary['success']:.1%} [{low:.1%}, {high:.1%}] over {summary['episodes']} episodes, "
            f"score {summary['score']:.3f}, turns {summary['turns']:.1f}, "
            f"invalid {summary['invalid_rate']:.1%}")
    if summary.get("truncated_rate"):
        line += f", truncated {summary['truncated_rate']:.1%}"
    if "tokens_per_s" in summary and summary["generated_tokens"]:
        line += f", {summary['tokens_per_s']:.0f} tok/s"
    if summary.get("prompt_cuts"):
        line += f", {summary['prompt_cuts']} prompts cut to fit the context"
    if summary.get("errors"):
        line += (f"; {summary['errors']} of {summary['episodes']} episodes ended in env errors "
                 f"(first: {summary.get('first_error', '?')})")
    return line


def all_failed_by_error(summary: dict) -> bool:
    """Every episode of the evaluation ended in an env error (the CLI exits non-zero then)."""
    return summary.get("episodes", 0) > 0 and summary.get("errors", 0) == summary["episodes"]


# --- comparing two policies on the same tasks -----------------------------------------------

# two-sided 97.5% quantiles of Student's t for 1..10 degrees of freedom (beyond: the expansion below)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (table, then the
    Cornish-Fisher expansion around the normal's 1.96, within 2e-3 for df > 10)."""
    if df < 1:
        return float("nan")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_difference(a: Sequence[float], b: Sequence[float], bounds: tuple[float, float] = (-1.0, 1.0)) -> dict:
    """Mean of a_i - b_i over pairs with its 95% t interval ([mean, mean] for a single pair),
    clipped to `bounds`, the range the difference can take (success and score lie in [0, 1])."""
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    if n == 0:
        return {"mean": 0.0, "ci95": [0.0, 0.0], "n": 0}
    mean = sum(diffs) / n
    if n == 1:
        return {"mean": mean, "ci95": [mean, mean], "n": 1}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    low, high = bounds
    return {"mean": mean, "ci95": [max(low, mean - half), min(high, mean + half)], "n": n}


def pair_episodes(a: Sequence[Episode], b: Sequence[Episode]) -> list[tuple[int, int]]:
    """(index in a, index in b) of the episodes that played the same task: matched by task id,
    the k-th occurrence of a task in `a` with its k-th occurrence in `b`; in a's order."""
    where_b: dict[str, list[int]] = {}
    for j, ep in enumerate(b):
        where_b.setdefault(ep.task_id, []).append(j)
    seen: dict[str, int] = {}
    pairs = []
    for i, ep in enumerate(a):
        k = seen.get(ep.task_id, 0)
        seen[ep.task_id] = k + 1
        candidates = where_b.get(ep.task_id, [])
        if k < len(candidates):
            pairs.append((i, candidates[k]))
    return pairs


def outcome(a: Episode, b: Episode) -> str:
    """"a" when only a succeeded, "b" when only b did, "tie" otherwise."""
    if a.success == b.success:
        return "tie"
    return "a" if a.success else "b"


def compare_summary(a: Sequence[Episode], b: Sequence[Episode],
                    pairs: Sequence[tuple[int, int]] | None = None) -> dict:
    """Wins, losses and ties of a against b over paired episodes, and the paired differences
    (a - b) of success and score with 95% intervals."""
    pairs = pair_episodes(a, b) if pairs is None else pairs
    outcomes = [outcome(a[i], b[j]) for i, j in pairs]
    return {
        "pairs": len(pairs),
        "unpaired_a": len(a) - len(pairs),
        "unpaired_b": len(b) - len(pairs),
        "a_wins": outcomes.count("a"),
        "b_wins": outcomes.count("b"),
        "ties": outcomes.count("tie"),
        "success_diff": paired_difference([float(a[i].success) for i, _ in pairs],
                                          [float(b[j].success) for _, j in pairs]),
        "score_diff": paired_difference([a[i].score for i, _ in pairs], [b[j].score for _, j in pairs]),
    }


def save_comparison(out_dir: str | Path, runs: Sequence[tuple[str, dict, Sequence[Episode]]]) -> Path:
    """Write two evaluations side by side: OUT/a/ and OUT/b/ (report.json, episodes.jsonl each)
    and OUT/pairs.json, the pairing index: which episode of a played the same task as which of
    b, each pair's outcome, and the comparison summary. `runs`: two (model, summary, episodes)."""
    if len(runs) != 2:
        raise ValueError(f"save_comparison takes two runs, got {len(runs)}")
    out = Path(out_dir)
    (model_a, summary_a, eps_a), (model_b, summary_b, eps_b) = runs
    save_eval(out / "a", summary_a, eps_a)
    save_eval(out / "b", summary_b, eps_b)
    pairs = pair_episodes(eps_a, eps_b)
    index = {
        "schema_version": PAIRS_SCHEMA_VERSION,
        "a": {"model": model_a, "episodes": "a/episodes.jsonl", "success": summary_a["success"]},
        "b": {"model": model_b, "episodes": "b/episodes.jsonl", "success": summary_b["success"]},
        "summary": compare_summary(eps_a, eps_b, pairs),
        "pairs": [{"task_id": eps_a[i].task_id, "a": i, "b": j, "outcome": outcome(eps_a[i], eps_b[j]),
                   "a_success": eps_a[i].success, "b_success": eps_b[j].success,
                   "a_turns": eps_a[i].num_turns, "b_turns": eps_b[j].num_turns}
                  for i, j in pairs],
    }
    atomic_write_json(out / PAIRS_FILE, index)
    return out


def format_comparison(summary: dict, name_a: str = "A", name_b: str = "B") -> str:
    """One line: wins/losses/ties and the paired success difference with its interval."""
    diff = summary["success_diff"]
    low, high = diff["ci95"]
    return (f"{name_a} vs {name_b} on {summary['pairs']} paired tasks: {name_a} wins {summary['a_wins']}, "
            f"{name_b} wins {summary['b_wins']}, ties {summary['ties']}; success difference "
            f"{diff['mean']:+.1%} [{low:+.1%}, {high:+.1%}] (95% paired t interval)")
