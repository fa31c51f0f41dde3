"""Helpers for the trainer, SFT and pipeline tests: tiny run settings, a CLI runner for
subprocess tests, checkpoint weights and metrics readers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Runs small enough for a 2-core CPU: 1 task x 2 rollouts x 2 turns x 6 tokens per step.
TINY_RUN = {
    "steps": 3, "tasks_per_step": 1, "group_size": 2, "max_turns": 2, "max_new_tokens": 6,
    "lr": 1e-3, "micro_batch": 16, "eval_episodes": 0, "sample_episodes": 2, "checkpoint_every": 1,
    "keep_checkpoints": 2, "compare": False, "schedule.anneal_steps": 2, "warmup_steps": 2,
}


def overrides(**changes) -> list[str]:
    """`--set` strings for TINY_RUN updated with `changes` (dotted keys as key__sub)."""
    settings = dict(TINY_RUN)
    settings.update({k.replace("__", "."): v for k, v in changes.items()})
    return [f"{k}={_yaml(v)}" for k, v in settings.items()]


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    """`atod-edge ARGS` in a subprocess (the ATOD_EDGE_CACHE of the session is inherited)."""
    return subprocess.run([sys.executable, "-m", "atod_edge.cli", *args], cwd=cwd, env=cli_env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def load_weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint) / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metric_rows(run_dir: Path) -> list[dict]:
    """Per-step rows of metrics.jsonl without the wall-clock keys (time_*)."""
    from atod_edge.io import read_jsonl

    rows, skipped = read_jsonl(Path(run_dir) / "metrics.jsonl")
    assert skipped == 0
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def interrupt_sft_at_step(patch, step: int) -> None:
    """Make SFT's forward raise KeyboardInterrupt on its `step`-th call (one call a step when
    micro_batch = batch_size), whichever forward the step takes: per-turn (response_logprobs) or
    prefix reuse (shared_prefix_logprobs). `patch`: a pytest MonkeyPatch (or its context)."""
    from atod_edge.scoring import logprobs as scoring
    from atod_edge.scoring import prefix_tree as shared_prefix

    calls = []

    def interrupting(forward):
        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == step:
                raise KeyboardInterrupt
            return forward(*args, **kwargs)
        return interrupted

    patch.setattr(scoring, "response_logprobs", interrupting(scoring.response_logprobs))
    patch.setattr(shared_prefix, "shared_prefix_logprobs", interrupting(shared_prefix.shared_prefix_logprobs))
