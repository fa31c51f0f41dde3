"""Evaluation: run N episodes of any policy on an env split, summarise them, write a report.

The same code serves a training checkpoint, an ONNX or GGUF export, and the scripted policies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from atod_edge.config import opt
from atod_edge.episode import Episode, write_episodes
from atod_edge.io import atomic_write_json


@dataclass
class EvalConfig:
    env: str = opt("household", "environment name or import path pkg.module:Class")
    split: str = opt("eval", "task split", choices=["train", "eval", "unseen"])
    episodes: int = opt(100, "number of episodes", min=1)
    start: int = opt(0, "index of the first task in the split", min=0)
    temperature: float = opt(0.4, "sampling temperature (0 = greedy); the paper evaluates at 0.4", min=0.0)
    top_p: float = opt(1.0, "nucleus sampling threshold", min=0.0, max=1.0)
    max_new_tokens: int = opt(48, "max response tokens per turn", min=1)
    history_turns: int = opt(2, "past turns shown in the prompt", min=0)
    max_turns: int = opt(0, "turn limit per episode (0: the env's default)", min=0)
    batch_episodes: int = opt(64, "episodes rolled out concurrently", min=1)
    seed: int = opt(0, "sampling seed")
    device: str = opt("cpu", "torch device for PyTorch policies (cpu, cuda, cuda:1)")


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
        "errors": sum(1 for ep in episodes if "error" in ep.meta),
        "generated_tokens": tokens,
    }
    if seconds:
        summary["seconds"] = seconds
        summary["episodes_per_s"] = n / seconds
        summary["tokens_per_s"] = tokens / seconds
    return summary


def evaluate(policy, cfg: EvalConfig, progress: Callable[[int, int], None] | None = None,
             label_expert: bool = False) -> tuple[dict, list[Episode]]:
    """`policy` is a Policy (token-level) or one of "expert", "random". label_expert: record the
    scripted expert's action on every turn of a token-level policy (DAgger demos)."""
    from atod_edge.envs import env_class
    from atod_edge.policy import SamplingParams
    from atod_edge.rollout import run_episodes, run_scripted

    env_cls = env_class(cfg.env)
    tasks = env_cls().tasks(cfg.split, cfg.episodes, start=cfg.start)
    started = time.perf_counter()
    episodes: list[Episode] = []
    if isinstance(policy, str):
        episodes = run_scripted(policy, env_cls, tasks, seed=cfg.seed, max_turns=cfg.max_turns or None)
    else:
        sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  top_p=cfg.top_p)
        for start in range(0, len(tasks), cfg.batch_episodes):
            chunk = tasks[start:start + cfg.batch_episodes]
            episodes += run_episodes(policy, env_cls, chunk, sampling=sampling,
                                     seed=cfg.seed + start, history_turns=cfg.history_turns,
                                     max_turns=cfg.max_turns or None, label_expert=label_expert)
            if progress:
                progress(len(episodes), len(tasks))
    summary = summarize(episodes, time.perf_counter() - started)
    summary.update(env=cfg.env, split=cfg.split,
                   policy=policy if isinstance(policy, str) else policy.name)
    return summary, episodes


def save_eval(out_dir: str | Path, summary: dict, episodes: Sequence[Episode]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    episodes_path = out / "episodes.jsonl"
    if episodes_path.exists():
        episodes_path.unlink()
    write_episodes(episodes_path, episodes)
    atomic_write_json(out / "report.json", summary)
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
    return line
