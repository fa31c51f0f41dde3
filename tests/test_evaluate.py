"""Tests for atod_edge/evaluate.py: the Wilson interval, summaries, evaluate() and its report."""

from __future__ import annotations

import json

import pytest

from atod_edge.rollout.episode import Episode, Turn, read_episodes
from atod_edge.evaluate.evaluate import EvalConfig, evaluate, format_summary, save_eval, summarize, wilson_interval


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


# --- comparing two policies on the same tasks ------------------------------------------------

def test_t_quantile_matches_the_table_values():
    from atod_edge.evaluate.evaluate import t_quantile_975

    # two-sided 95% Student t quantiles from any statistics table
    for df, expected in [(1, 12.706), (4, 2.776), (10, 2.228), (20, 2.086), (60, 2.000), (1000, 1.962)]:
        assert t_quantile_975(df) == pytest.approx(expected, abs=2e-3)


def test_paired_difference_hand_computed():
    from atod_edge.evaluate.evaluate import paired_difference

    # differences [1, 0, 1, 0, 0]: mean 0.4, sd sqrt(0.3), half-width 2.776 * sqrt(0.3) / sqrt(5) = 0.680
    result = paired_difference([1, 1, 1, 0, 1], [0, 1, 0, 0, 1])
    assert result["mean"] == pytest.approx(0.4) and result["n"] == 5
    assert result["ci95"] == pytest.approx([0.4 - 0.680, 1.0], abs=1e-3)     # the upper end clipped at 1
    assert paired_difference([0.5], [0.25]) == {"mean": 0.25, "ci95": [0.25, 0.25], "n": 1}
    assert paired_difference([], [])["n"] == 0


def test_pairing_by_task_and_the_comparison_files(tmp_path):
    from atod_edge.evaluate.evaluate import PAIRS_FILE, compare_summary, format_comparison, pair_episodes, save_comparison

    def ep(task: str, success: bool) -> Episode:
        return Episode("household", task, 0, "eval", success=success, score=float(success))

    a = [ep("t0", True), ep("t1", False), ep("t1", True), ep("t2", False)]
    b = [ep("t1", True), ep("t0", False), ep("t9", True), ep("t1", True)]
    # the k-th t1 of a with the k-th t1 of b; t2 and t9 have no partner
    assert pair_episodes(a, b) == [(0, 1), (1, 0), (2, 3)]
    s = compare_summary(a, b)
    assert (s["pairs"], s["a_wins"], s["b_wins"], s["ties"], s["unpaired_a"], s["unpaired_b"]) == (3, 1, 1, 1, 1, 1)
    assert "A wins 1, B wins 1, ties 1" in format_comparison(s)
    summary = summarize(a)
    out = save_comparison(tmp_path / "cmp", [("model-a", summary, a), ("model-b", summarize(b), b)])
    index = json.loads((out / PAIRS_FILE).read_text())
    assert index["a"]["model"] == "model-a" and index["b"]["episodes"] == "b/episodes.jsonl"
    assert [(p["a"], p["b"], p["outcome"]) for p in index["pairs"]] == [(0, 1, "a"), (1, 0, "b"), (2, 3, "tie")]
    assert len(read_episodes(out / "b" / "episodes.jsonl")[0]) == 4
