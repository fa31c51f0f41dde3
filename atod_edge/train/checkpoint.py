"""Checkpoints of a training run (RL, trainer.py, and SFT, sft.py): RUN/checkpoints/step_XXXXXX/,
a plain transformers model plus trainer_state.pt (optimizer, LR scheduler, torch RNG), written
atomically so that a killed run leaves no half checkpoint, and the newest complete one, which a
resume starts from. With LoRA the saved weights are merged and the adapter goes beside them
(lora.py). Only rank 0 writes them; under fsdp the optimizer state is first gathered to it
(distributed.optimizer_state).

One environment variable exists for tests only (they cannot monkeypatch a subprocess):
    ATOD_EDGE_TEST_KILL_IN_CHECKPOINT=N   SIGKILL this process while it writes the checkpoint of
                                          step N, after the weights, before the atomic rename
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import torch

from atod_edge.io import atomic_path
from atod_edge.train.distributed import load_optimizer_state
from atod_edge.train.lora import ADAPTER_DIR, merged_state_dict, save_adapter

CHECKPOINT_RE = re.compile(r"^step_(\d{6})$")


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint (temporary dirs of a killed write start with a dot)."""
    found = []
    for p in (run_dir / "checkpoints").glob("step_*"):
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / "trainer_state.pt").is_file():
            found.append((int(m.group(1)), p))
    return max(found) if found else None


def save_checkpoint(run_dir: Path, done_steps: int, student, tokenizer, optimizer_state: dict, scheduler,
                    keep: int, adapter=None) -> Path:
    """A plain transformers checkpoint plus trainer_state.pt. With LoRA (`adapter`: the PeftModel)
    the weights saved are the merged ones, and the adapter goes to adapter/ for resume."""
    path = run_dir / "checkpoints" / f"step_{done_steps:06d}"
    with atomic_path(path) as tmp:
        if adapter is not None:
            student.save_pretrained(tmp, state_dict=merged_state_dict(student), safe_serialization=True)
            save_adapter(adapter, tmp / ADAPTER_DIR)
        else:
            student.save_pretrained(tmp, safe_serialization=True)
        if os.environ.get("ATOD_EDGE_TEST_KILL_IN_CHECKPOINT") == str(done_steps):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die mid-write (see module docstring)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": done_steps, "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()},
                   tmp / "trainer_state.pt")
    old = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if CHECKPOINT_RE.match(p.name))
    for stale in old[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    for tmp_dir in (run_dir / "checkpoints").glob(".step_*"):   # left by a killed write
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def load_trainer_state(checkpoint: Path, student, optimizer, scheduler, fsdp: bool) -> None:
    """Resume from a checkpoint's trainer_state.pt: the optimizer state (under fsdp, sharded onto
    the ranks), the LR scheduler's position and the torch RNG."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location="cpu")
    load_optimizer_state(student, optimizer, state["optimizer"], fsdp, checkpoint)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
