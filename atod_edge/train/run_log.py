"""What a training run records and prints (RL, trainer.py, and SFT, sft.py): metrics.jsonl rows
(one JSON object a line, keys sorted), the step's row of rollout, batch, update and timing
figures (episode means summed over ranks), the per-step samples for the TUI, TensorBoard
scalars, the progress line on stderr, and the resume's cut of metrics.jsonl back to its
checkpoint. The last stage of a step, after the update; only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from atod_edge.io import append_line, atomic_write_text, read_jsonl
from atod_edge.rollout.episode import Episode, write_episodes
from atod_edge.train.distributed import DistInfo, all_reduce_sum


def json_line(row: dict) -> str:
    """One metrics.jsonl line (without its newline): the row as JSON, keys sorted."""
    return json.dumps(row, sort_keys=True)


def format_duration(seconds: float) -> str:
    """A duration for a progress line: "42s", "3m07s"; "?" when unknown (not finite)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def truncate_metrics(path: Path, done_steps: int) -> None:
    """Drop metric lines of steps after the checkpoint being resumed (they will be redone)."""
    if not path.exists():
        return
    records, _ = read_jsonl(path)
    kept = [r for r in records if int(r.get("step", 0)) < done_steps]
    atomic_write_text(path, "".join(json_line(r) + "\n" for r in kept))


def sync(device: str) -> None:
    # Phase timings need the GPU's queue drained; once per phase, never inside the loops. This
    # rank's GPU, named: a bare synchronize() would touch the current device (GPU 0 if unset)
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(torch.device(device))


def peak_memory(device: str) -> dict[str, float]:
    """CUDA: the student device's peak allocated memory since the last call (this step), in MiB."""
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return {}
    peak = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    torch.cuda.reset_peak_memory_stats(torch.device(device))
    return {"cuda_peak_mib": peak}


def episode_metrics(episodes: list[Episode], info: DistInfo, device) -> dict[str, float]:
    """Rollout means over every rank's episodes: success, reward, score, turns, invalid rate and
    truncated rate (turns cut at max_new_tokens)."""
    sums = torch.tensor([len(episodes), sum(ep.success for ep in episodes), sum(ep.reward for ep in episodes),
                         sum(ep.score for ep in episodes), sum(ep.num_turns for ep in episodes),
                         sum(ep.num_invalid for ep in episodes), sum(ep.num_truncated for ep in episodes)],
                        dtype=torch.float64, device=device)
    n, success, reward, score, turns, invalid, truncated = all_reduce_sum(sums, info).tolist()
    episodes_total, n = int(n), max(n, 1.0)
    return {"episodes": episodes_total, "success": success / n, "reward": reward / n, "score": score / n,
            "episode_len": turns / n, "invalid_rate": invalid / max(1.0, turns),
            "truncated_rate": truncated / max(1.0, turns)}


def step_row(step: int, episodes: list[Episode], stats: dict, lr: float, timings: dict[str, float],
             info: DistInfo, device: str) -> dict:
    """metrics.jsonl's row of one training step: the rollout's means (a collective: every rank
    calls this), the batch's and the update's `stats`, the learning rate the step used, CUDA peak
    memory, the phases' `timings` and the step's token counts."""
    return {
        "step": step,
        **episode_metrics(episodes, info, device),
        **stats,
        "lr": lr,
        **peak_memory(device),
        **timings,
        "generated_tokens": sum(len(t.response_ids or []) for ep in episodes for t in ep.turns),
        "prompt_tokens": sum(len(t.prompt_ids or []) for ep in episodes for t in ep.turns),
    }


def write_step_records(run_dir: Path, row: dict, episodes: list[Episode], sample_episodes: int, tb) -> None:
    """Rank 0's records of a step: the first `sample_episodes` episodes with their token-level
    fields (samples/step_XXXXXX.jsonl, for the TUI), the metrics row, and its TensorBoard scalars."""
    step = row["step"]
    if sample_episodes:
        (run_dir / "samples").mkdir(exist_ok=True)
        sample_path = run_dir / "samples" / f"step_{step:06d}.jsonl"
        sample_path.unlink(missing_ok=True)
        write_episodes(sample_path, episodes[:sample_episodes])
    append_line(run_dir / "metrics.jsonl", json_line(row))
    if tb:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step":
                tb.add_scalar(key, value, step)


def tensorboard(run_dir: Path):
    """A TensorBoard writer to RUN/tensorboard, or None without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def print_progress(done: int, total: int, first: int, row: dict, started: float) -> None:
    """The training progress line on stderr, rewritten in place (a newline after the last step).
    The share of turns cut at max_new_tokens shows when there are any (e.g. a reasoning model
    thinking past the limit: no action)."""
    elapsed = time.perf_counter() - started
    per_step = elapsed / max(1, done - first)
    eta = per_step * (total - done)
    truncated = f"truncated {row['truncated_rate']:.1%} | " if row.get("truncated_rate", 0) > 0 else ""
    print(f"\rstep {done}/{total} | success {row['success']:.2f} | reward {row['reward']:.2f} | "
          f"kappa {row['kappa']:.2f} rho {row['rho']:.2f} | w {row['mean_turn_weight']:.2f} | {truncated}"
          f"{row.get('episodes', 0) / max(row['time_rollout'], 1e-9):.1f} episodes/s | "
          f"{per_step:.1f}s/step | ETA {format_duration(eta)}   ", end="" if done < total else "\n",
          file=sys.stderr, flush=True)
