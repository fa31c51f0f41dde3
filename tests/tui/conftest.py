"""Fixtures for the TUI tests: a run directory (written by train()), episode files, and a tiny env
registered by name."""

from __future__ import annotations

import pytest

pytest.importorskip("textual")

from tui_fixtures import (BAD_ENVS, CountingEnv, build_tokenizer, copy_run_dir,  # noqa: E402
                          env_spec, make_episodes, write_episodes_file)


@pytest.fixture
def run_dir(trained_run, tmp_path):
    """A copy of the real trainer's run directory, with a corrupt line and a torn last line."""
    return copy_run_dir(trained_run, tmp_path / "run")


@pytest.fixture
def tokenizer(tmp_path):
    return build_tokenizer(tmp_path / "tok" / "tokenizer.json")


@pytest.fixture
def episodes_file(tmp_path, tokenizer):
    return write_episodes_file(tmp_path / "episodes.jsonl", make_episodes(tokenizer))


@pytest.fixture
def test_envs(monkeypatch):
    """Register the tiny test envs as if they were built in ("counting", and the misbehaving
    "broken", "garbage", "hanging" and "broken-expert")."""
    from atod_edge import envs

    monkeypatch.setitem(envs.BUILTIN, "counting", env_spec(CountingEnv))
    for name, cls in BAD_ENVS.items():
        monkeypatch.setitem(envs.BUILTIN, name, env_spec(cls))
    return envs.BUILTIN
