"""Two CPU processes under torchrun (gloo): the trainer's data-parallel path, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from train_fixtures import cli_env, load_weights, metric_rows, overrides, same_weights


def test_two_gloo_ranks_bootstrap_once_train_and_hold_identical_weights(atod_cache, small_teacher, tmp_path):
    run_dir, dumps = tmp_path / "run", tmp_path / "weights"
    settings = overrides(steps=2, tasks_per_step=2, bootstrap__student_episodes=1, bootstrap__student_epochs=1)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "atod_edge.cli", "train", "--out", str(run_dir), "--set", "student=auto",
               "--set", f"teacher={small_teacher}", *[a for o in settings for a in ("--set", o)]]
    result = subprocess.run(command, cwd=tmp_path, env=cli_env(ATOD_EDGE_TEST_DUMP_WEIGHTS=str(dumps)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr

    # the cold-start student was bootstrapped once, by rank 0, and rank 1 found it in the cache
    assert output.count("bootstrapping by SFT") == 1
    student = Path(json.loads((run_dir / "run.json").read_text())["student"])
    assert student.parent == atod_cache / "bootstrap"

    # both ranks hold the same weights, equal to rank 0's final checkpoint, and they moved
    rank0 = torch.load(dumps / "rank0.pt", weights_only=True)
    rank1 = torch.load(dumps / "rank1.pt", weights_only=True)
    assert same_weights(rank0, rank1)
    checkpoint = load_weights(run_dir / "checkpoints" / "step_000002")
    assert same_weights(checkpoint, {k: rank0[k] for k in checkpoint})
    assert not same_weights(checkpoint, load_weights(student))

    # only rank 0 wrote: one row per step, covering the episodes of both ranks (2 tasks x 2)
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["episodes"] == 4 and r["tokens"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert output.count("training atod on household") == 1
