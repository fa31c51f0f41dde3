"""Fixtures for the TUI tests: a run directory, episode files, and a tiny env registered by name."""

from __future__ import annotations

import pytest

pytest.importorskip("textual")

from tui_fixtures import (BrokenEnv, CountingEnv, build_tokenizer, env_spec,  # noqa: E402
                          make_episodes, write_episodes_file, write_run_dir)


@pytest.fixture
def run_dir(tmp_path):
    return write_run_dir(tmp_path / "run")


@pytest.fixture
def tokenizer(tmp_path):
    return build_tokenizer(tmp_path / "tok" / "tokenizer.json")


@pytest.fixture
def episodes_file(tmp_path, tokenizer):
    return write_episodes_file(tmp_path / "episodes.jsonl", make_episodes(tokenizer))


@pytest.fixture
def test_envs(monkeypatch):
    """Register the tiny test envs as if they were built in ("counting", "broken")."""
    from atod_edge import envs

    monkeypatch.setitem(envs.BUILTIN, "counting", env_spec(CountingEnv))
    monkeypatch.setitem(envs.BUILTIN, "broken", env_spec(BrokenEnv))
    return envs.BUILTIN
