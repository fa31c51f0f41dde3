"""The paired agent table's statistics: loop detection and the paired 95% interval."""

from __future__ import annotations

import pytest

from atod_edge.rollout.episode import Episode, Turn
from atod_edge.export.verify import agent_summary, has_loop, paired_interval


def _episode(task: str, actions, success: bool = False) -> Episode:
    turns = [Turn(observation="o", action=a, valid=a is not None and not a.startswith("bad")) for a in actions]
    return Episode(env="e", task_id=task, seed=0, split="eval", turns=turns, success=success)


def test_a_loop_is_one_action_three_times_in_a_row():
    assert has_loop(_episode("t", ["a", "b", "b", "b"]))
    assert has_loop(_episode("t", ["bad x", "bad x", "bad x"]))          # a repeated invalid action
    assert has_loop(_episode("t", [None, None, None]))                   # no action, three times
    assert not has_loop(_episode("t", ["a", "b", "a", "b", "a"]))
    assert not has_loop(_episode("t", ["bad x", "bad y", "bad z"]))      # different invalid actions


def test_paired_interval_is_honest_with_few_episodes_and_no_discordant_pair():
    lo, hi = paired_interval([False] * 10, [False] * 10)
    assert lo < 0 < hi and hi == pytest.approx(-lo) and 0.1 < hi < 0.2   # not [0, 0]
    lo, hi = paired_interval([True] * 30 + [False] * 70, [False] * 100)
    assert 0.2 < lo < 0.3 < hi < 0.4                                     # 30 gained of 100
    assert paired_interval([False] * 5, [True] * 5)[0] >= -1.0


def test_agent_summary_pairs_by_task_and_counts_rates():
    student = [_episode(f"t{i}", ["a", "b"], success=i < 2) for i in range(4)]
    exported = [_episode("t0", ["a", "a", "a"], True), _episode("t1", ["bad", "b"]),
                _episode("t2", ["a"], True), _episode("t3", [None, "b"])]
    row = agent_summary(exported, reference=student)
    assert row["success_rate"] == 0.5 and row["points_vs_student"] == 0.0 and row["discordant"] == 2
    assert row["invalid_rate"] == pytest.approx(2 / 8) and row["loop_rate"] == 0.25
    assert row["mean_turns"] == 2.0
    lo, hi = row["points_ci95"]
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="same tasks"):
        agent_summary(exported[::-1], reference=student)
