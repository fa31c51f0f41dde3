"""Tests for train/tdur.py: T-DUR turn weights, ATOD.md section 4."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atod_edge.errors import UserError
from atod_edge.train.tdur import minmax_per_trajectory, token_level_weights, token_weights, turn_statistics, turn_weights

# Two-turn trajectory, by hand:
#   turn 0: lp_S [-1, -3], lp_T [-2, -1]  -> d = (1 + 2) / 2 = 1.5,  h = (1 + 3) / 2 = 2
#   turn 1: lp_S [-2],     lp_T [-1.25]   -> d = 0.75,               h = 2
#   d~ = [1, 0], h~ = [0.5, 0.5] (flat)  -> w = 1 - (1 - d~)(1 - 0.5) = [1, 0.5]
TWO_TURN_S = [-1.0, -3.0, -2.0]
TWO_TURN_T = [-2.0, -1.0, -1.25]
TWO_TURN_INDEX = [0, 0, 1]


def test_turn_statistics_two_turns():
    stats = turn_statistics(torch.tensor(TWO_TURN_S), torch.tensor(TWO_TURN_T), torch.tensor(TWO_TURN_INDEX))
    torch.testing.assert_close(stats.disagreement, torch.tensor([1.5, 0.75]))
    torch.testing.assert_close(stats.uncertainty, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(stats.token_count, torch.tensor([2.0, 1.0]))


def test_two_turn_weights_by_hand():
    weights = token_weights(torch.tensor(TWO_TURN_S), torch.tensor(TWO_TURN_T), torch.tensor(TWO_TURN_INDEX),
                            traj_index_of_turn=torch.tensor([0, 0]))
    torch.testing.assert_close(weights, torch.tensor([1.0, 1.0, 0.5]))


def test_three_turn_weights_interior_value():
    # turn 2 added to turn 0 above: lp_S [-0.5] lp_T [-0.5] -> d 0, h 0.5; lp_S [-1] lp_T [-0.25] -> d .75, h 1
    # d = [1.5, 0, .75] -> d~ = [1, 0, .5]; h = [2, .5, 1] -> h~ = [1, 0, 1/3]; w2 = 1 - .5 * 2/3
    d = torch.tensor([1.5, 0.0, 0.75])
    h = torch.tensor([2.0, 0.5, 1.0])
    weights = turn_weights(d, h, torch.tensor([0, 0, 0]))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0, 2.0 / 3.0]))


def test_one_turn_trajectory_gets_three_quarters():
    weights = token_weights(torch.tensor([-0.3, -2.0, -0.1]), torch.tensor([-5.0, -0.2, -0.1]),
                            torch.tensor([0, 0, 0]), traj_index_of_turn=torch.tensor([0]))
    torch.testing.assert_close(weights, torch.full((3,), 0.75))


def test_minmax_flat_rule_and_per_trajectory():
    values = torch.tensor([3.0, 1.0, 2.0, 5.0, 5.0 + 1e-9])
    traj = torch.tensor([0, 0, 0, 1, 1])
    torch.testing.assert_close(minmax_per_trajectory(values, traj), torch.tensor([1.0, 0.0, 0.5, 0.5, 0.5]))


def test_batch_normalises_each_trajectory_separately_and_ignores_masked_tokens():
    # trajectory 0: one turn (turn id 0); trajectory 1: the two-turn case (turn ids 1, 2).
    # Tokens with turn index -1 (prompt / observations / padding) carry wild values that must not matter.
    student = torch.tensor([[-9.0, -0.3, -2.0, -9.0, -9.0, -9.0],
                            [-9.0, -1.0, -3.0, -9.0, -2.0, -9.0]])
    teacher = torch.tensor([[0.0, -5.0, -0.2, 0.0, 0.0, 0.0],
                            [0.0, -2.0, -1.0, 0.0, -1.25, 0.0]])
    turn_index = torch.tensor([[-1, 0, 0, -1, -1, -1],
                               [-1, 1, 1, -1, 2, -1]])
    weights = token_weights(student, teacher, turn_index, traj_index_of_turn=torch.tensor([0, 1, 1]))
    expected = torch.tensor([[0.0, 0.75, 0.75, 0.0, 0.0, 0.0],
                             [0.0, 1.0, 1.0, 0.0, 0.5, 0.0]])
    torch.testing.assert_close(weights, expected)


def test_ablation_modes_on_two_turn_case():
    d, h, traj = torch.tensor([1.5, 0.75]), torch.tensor([2.0, 2.0]), torch.tensor([0, 0])
    torch.testing.assert_close(turn_weights(d, h, traj, "uniform"), torch.ones(2))
    torch.testing.assert_close(turn_weights(d, h, traj, "disagreement"), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(turn_weights(d, h, traj, "uncertainty"), torch.tensor([0.5, 0.5]))
    with pytest.raises(UserError, match="tdur, uniform"):
        turn_weights(d, h, traj, "entropy")


def test_empty_turn_does_not_set_the_range():
    # Turn 1 has no response tokens; without exclusion its d = h = 0 would become the minimum.
    student = torch.tensor([-1.0, -3.0, -2.0])
    teacher = torch.tensor([-2.0, -1.0, -1.25])
    turn_index = torch.tensor([0, 0, 2])
    weights = token_weights(student, teacher, turn_index, traj_index_of_turn=torch.tensor([0, 0, 0]))
    torch.testing.assert_close(weights, torch.tensor([1.0, 1.0, 0.5]))


def test_token_level_weights_by_hand():
    # d_t = [1, 2, .75] -> d~ = [.2, 1, 0]; h_t = [1, 3, 2] -> h~ = [0, 1, .5]
    # w = 1 - (1 - d~)(1 - h~) = [.2, 1, .5]; the masked token gets 0.
    student = torch.tensor([-1.0, -3.0, -9.0, -2.0])
    teacher = torch.tensor([-2.0, -1.0, 0.0, -1.25])
    weights = token_level_weights(student, teacher, torch.tensor([0, 0, -1, 0]))
    torch.testing.assert_close(weights, torch.tensor([0.2, 1.0, 0.0, 0.5]))
    via_turns = token_weights(student, teacher, torch.tensor([0, 0, -1, 1]), torch.tensor([0, 0]), level="token")
    torch.testing.assert_close(via_turns, weights)


def test_weights_are_detached():
    student = torch.tensor([-1.0, -3.0, -2.0], requires_grad=True)
    weights = token_weights(student, torch.tensor(TWO_TURN_T), torch.tensor(TWO_TURN_INDEX), torch.tensor([0, 0]))
    assert not weights.requires_grad


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-20, 0), st.floats(-20, 0), st.integers(0, 3)), min_size=1, max_size=30))
def test_weights_always_in_unit_interval(tokens):
    student = torch.tensor([t[0] for t in tokens])
    teacher = torch.tensor([t[1] for t in tokens])
    turn_index = torch.tensor([t[2] for t in tokens])
    # turns 0, 1 -> trajectory 0; turns 2, 3 -> trajectory 1
    weights = token_weights(student, teacher, turn_index, torch.tensor([0, 0, 1, 1]))
    assert torch.all((weights >= 0) & (weights <= 1))
    for level in ("turn", "token"):
        w = token_weights(student, teacher, turn_index, torch.tensor([0, 0, 1, 1]), level=level)
        assert torch.isfinite(w).all()
