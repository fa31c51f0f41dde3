"""Tests for train/advantages.py: ATOD.md sections 1-3."""

import math

import torch

from atod_edge.train.advantages import broadcast_to_tokens, combine, grpo_advantages, opd_advantages


def test_all_equal_group_gives_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7])
    groups = torch.tensor([3, 3, 3, 9, 9])
    assert torch.equal(grpo_advantages(rewards, groups), torch.zeros(5))


def test_all_equal_group_is_exactly_zero_even_when_the_float_mean_is_not():
    # In float64 the mean of three 0.7s is off by an ulp; divided by (0 + eps) that would be ~1e-10.
    rewards = torch.full((3,), 0.7, dtype=torch.float64)
    assert torch.equal(grpo_advantages(rewards, torch.zeros(3, dtype=torch.long)), torch.zeros(3, dtype=torch.float64))


def test_known_three_rollout_group_uses_sample_std():
    # r = [1, 0, 0]: mean 1/3, sample std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3).
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0, 0, 0]), eps=0.0)
    std = math.sqrt(1 / 3)
    torch.testing.assert_close(adv, torch.tensor([(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std]))
    assert abs(float(adv.sum())) < 1e-6  # centred


def test_eps_in_denominator():
    adv = grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), eps=1e-6)
    std = math.sqrt(0.5)  # sample std of [1, 0]
    torch.testing.assert_close(adv, torch.tensor([0.5 / (std + 1e-6), -0.5 / (std + 1e-6)]))


def test_groups_are_independent_and_interleaved():
    rewards = torch.tensor([1.0, 5.0, 0.0, 5.0, 0.0, 5.0])
    groups = torch.tensor([7, 2, 7, 2, 7, 2])
    adv = grpo_advantages(rewards, groups)
    alone = grpo_advantages(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0, 0, 0]))
    torch.testing.assert_close(adv[[0, 2, 4]], alone)
    assert torch.equal(adv[[1, 3, 5]], torch.zeros(3))


def test_single_rollout_group_is_zero():
    assert torch.equal(grpo_advantages(torch.tensor([1.0]), torch.tensor([0])), torch.zeros(1))


def test_opd_advantage_sign_weights_and_detach():
    teacher = torch.tensor([-0.5, -3.0, -1.0])
    student = torch.tensor([-1.0, -1.0, -1.0], requires_grad=True)
    weights = torch.tensor([1.0, 0.5, 0.75])
    adv = opd_advantages(teacher, student, weights)
    torch.testing.assert_close(adv, torch.tensor([0.5, -1.0, 0.0]))
    assert not adv.requires_grad
    torch.testing.assert_close(opd_advantages(teacher, student), torch.tensor([0.5, -2.0, 0.0]))


def test_combine_mixes_with_coefficients():
    opd = torch.tensor([1.0, -2.0])
    grpo = torch.tensor([0.5, 0.5])
    torch.testing.assert_close(combine(opd, grpo, 0.55, 1.5), torch.tensor([0.55 + 0.75, -1.1 + 0.75]))
    torch.testing.assert_close(combine(opd, None, 1.0, 0.0), opd)
    torch.testing.assert_close(combine(None, grpo, 0.0, 1.0), grpo)


def test_combine_refuses_missing_term_with_nonzero_coefficient():
    try:
        combine(None, torch.ones(2), 0.5, 1.0)
    except ValueError as e:
        assert "kappa" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_broadcast_to_tokens_masks_negative_index():
    values = torch.tensor([2.0, -1.0])
    index = torch.tensor([[0, 0, -1], [1, -1, -1]])
    assert torch.equal(broadcast_to_tokens(values, index), torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
