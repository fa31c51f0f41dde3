"""Fixtures for the trainer, SFT and pipeline tests (helpers are in train_fixtures.py)."""

from __future__ import annotations

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


# small_teacher and trained_run (a real train() run) are in tests/conftest.py: the TUI and CLI tests use them too
