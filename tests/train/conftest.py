"""Fixtures for the trainer, SFT and pipeline tests (helpers are in train_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: faster on a loaded 2-core machine, and the same thread count as the
    subprocesses (OMP_NUM_THREADS=1), so in-process and CLI runs compute bit-identical numbers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_teacher(atod_cache, tmp_path_factory) -> Path:
    """A teacher with the student's tokenizer but other outputs: tiny-student cut to its first
    layer (cheaper than tiny-teacher, and unlike the student itself it disagrees with it)."""
    from atod_edge.models import shrink_model

    return shrink_model("tiny-student", [0], tmp_path_factory.mktemp("teacher") / "small-teacher")
