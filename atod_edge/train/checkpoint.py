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


def latest_checkpoint(run_dir: Path, log=None) -> tuple[int, Path] | None:
    """The newest intact checkpoint (temporary dirs of a killed write start with a dot): each is
    verified before use (checkpoint_problem), and a damaged newer one is skipped, with a line to
    `log` saying which and why."""
    found = []
    for p in (Path(run_dir) / "checkpoints").glob("step_*"):
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    for step, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return step, path
        if log is not None:
            log(f"skipping checkpoint {path.name}: {problem}")
    return None


#: trainer_state.pt files up to this size get every entry's CRC checked; larger ones (the optimizer
#: state of a big model) only their zip directory, which a torn write loses
_CRC_CHECK_BYTES = 1 << 30


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint dir `path` cannot be resumed from, or None when it is intact: every
    safetensors file's header parses and its size is the one the header declares, and
    trainer_state.pt is a complete zip archive (torch.save's format) whose entries' CRCs match."""
    import zipfile

    state = path / "trainer_state.pt"
    if not state.is_file():
        return "no trainer_state.pt"
    weights = sorted(path.rglob("*.safetensors"))
    if not weights:
        return "no *.safetensors weights"
    for file in weights:
        problem = _safetensors_problem(file)
        if problem:
            return f"{file.relative_to(path)} {problem}"
    try:
        with zipfile.ZipFile(state) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "trainer_state.pt holds no torch data"
            if state.stat().st_size <= _CRC_CHECK_BYTES and archive.testzip() is not None:
                return "trainer_state.pt is damaged (a CRC does not match)"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"trainer_state.pt is torn or damaged ({type(e).__name__})"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """None when the file's header parses and the file is as long as the header says."""
    import json

    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, 100 << 20):
                return "is torn or damaged (no header)"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "is torn or damaged (unreadable header)"
    if size != 8 + n + end:
        return f"is torn ({size} bytes, its header declares {8 + n + end})"
    return None


def save_checkpoint(run_dir: Path, done_steps: int, student, tokenizer, optimizer_state: dict, scheduler,
                    keep: int, adapter=None) -> Path:
    """A plain transformers checkpoint plus trainer_state.pt. With LoRA (`adapter`: the PeftModel)
    the weights saved are the merged ones, and the adapter goes to adapter/ for resume."""
    path = run_dir / "checkpoints" / f"step_{done_steps:06d}"
    with atomic_path(path, need_bytes=_checkpoint_bytes(student, optimizer_state)) as tmp:
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
    # after a resume from an older checkpoint (a newer one was damaged), the newer ones are redone
    newer = [p for p in old if p.name > path.name]
    old = [p for p in old if p.name <= path.name]
    for stale in newer + old[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    for tmp_dir in (run_dir / "checkpoints").glob(".step_*"):   # left by a killed write
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _checkpoint_bytes(model, optimizer_state: dict) -> int:
    """About what a checkpoint takes on disk: the weights plus the optimizer state's tensors."""
    def tensor_bytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(tensor_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensor_bytes(v) for v in obj)
        return 0

    return sum(p.numel() * p.element_size() for p in model.parameters()) + tensor_bytes(optimizer_state)


def load_trainer_state(checkpoint: Path, student, optimizer, scheduler, fsdp: bool) -> None:
    """Resume from a checkpoint's trainer_state.pt: the optimizer state (under fsdp, sharded onto
    the ranks), the LR scheduler's position and the torch RNG."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location="cpu")
    load_optimizer_state(student, optimizer, state["optimizer"], fsdp, checkpoint)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
