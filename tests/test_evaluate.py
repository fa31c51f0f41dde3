"""Tests for atod_edge/evaluate.py: the Wilson interval, summaries, evaluate() and its report."""

from __future__ import annotations

import json

import pytest

from atod_edge.episode import Episode, Turn, read_episodes
from atod_edge.evaluate import EvalConfig, evaluate, format_summary, save_eval, summarize, wilson_interval


def test_wilson_interval_known_values_and_edges():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 0.0)


@pytest.mark.parametrize("wins, n", [(1, 3), (7, 20), (99, 100), (1, 1000)])
def test_wilson_interval_contains_the_rate_and_narrows_with_more_episodes(wins, n):
    low, high = wilson_interval(wins, n)
    assert 0.0 <= low <= wins / n <= high <= 1.0
    low_more, high_more = wilson_interval(wins * 10, n * 10)
    assert high_more - low_more < high - low


def make_episode(success: bool, valid: list[bool], tokens: int = 0, error: bool = False) -> Episode:
    turns = [Turn("o", valid=v, response_ids=list(range(tokens)) if tokens else None) for v in valid]
    return Episode("household", "t", 0, "eval", turns=turns, success=success, score=1.0 if success else 0.25,
                   meta={"error": "boom"} if error else {})


def test_summarize_counts():
    episodes = [make_episode(True, [True, True], tokens=3), make_episode(False, [False, True, False], tokens=2),
                make_episode(False, [], error=True), make_episode(True, [True])]
    summary = summarize(episodes, seconds=2.0)
    assert summary["episodes"] == 4 and summary["success"] == 0.5
    assert summary["success_ci95"] == list(wilson_interval(2, 4))
    assert summary["score"] == pytest.approx((1 + 0.25 + 0.25 + 1) / 4)
    assert summary["turns"] == pytest.approx(6 / 4)
    assert summary["invalid_rate"] == pytest.approx(2 / 6)
    assert summary["errors"] == 1
    assert summary["generated_tokens"] == 3 * 2 + 2 * 3
    assert summary["tokens_per_s"] == pytest.approx(6.0) and summary["episodes_per_s"] == 2.0
    empty = summarize([])
    assert empty["episodes"] == 0 and empty["success"] == 0.0 and "tokens_per_s" not in empty


def test_evaluate_scripted_policies():
    summary, episodes = evaluate("expert", EvalConfig(env="household", episodes=5))
    assert summary["success"] == 1.0 and summary["invalid_rate"] == 0.0 and len(episodes) == 5
    assert (summary["policy"], summary["env"], summary["split"]) == ("expert", "household", "eval")
    assert [ep.task_id for ep in episodes] == [f"household/eval/{i}" for i in range(5)]
    summary, _ = evaluate("random", EvalConfig(env="household", episodes=10, start=3))
    assert summary["success"] <= 0.2


def test_evaluate_a_model_in_chunks_with_progress(student_policy, tmp_path):
    calls = []
    cfg = EvalConfig(env="searchqa", episodes=3, batch_episodes=2, max_new_tokens=4, temperature=1.0)
    summary, episodes = evaluate(student_policy, cfg, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 3), (3, 3)]
    assert len(episodes) == 3 and summary["policy"] == "tiny-student"
    assert summary["generated_tokens"] > 0 and summary["tokens_per_s"] > 0
    assert all(t.response_ids and len(t.response_ids) <= 4 for ep in episodes for t in ep.turns)
    assert "tok/s" in format_summary(summary)

    out = save_eval(tmp_path / "eval", summary, episodes)
    save_eval(out, summary, episodes)            # a second save replaces, never appends
    loaded, skipped = read_episodes(out / "episodes.jsonl")
    assert skipped == 0 and [ep.to_dict() for ep in loaded] == [ep.to_dict() for ep in episodes]
    assert json.loads((out / "report.json").read_text())["episodes"] == 3


def test_format_summary_reads_well():
    summary = summarize([make_episode(True, [True]), make_episode(False, [False])])
    summary.update(policy="expert", env="shop", split="unseen")
    line = format_summary(summary)
    assert line.startswith("expert on shop/unseen: success 50.0% [")
    assert "invalid 50.0%" in line and "tok/s" not in line
