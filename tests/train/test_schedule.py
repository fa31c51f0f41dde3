"""Tests for train/schedule.py: ATOD.md section 3 and the baselines of section 8."""

import math

import pytest

from atod_edge.errors import UserError
from atod_edge.train.schedule import ScheduleConfig, coefficients, kappa, progress, rho

T = 80


@pytest.mark.parametrize("step, expected", [(0, 0.0), (T / 2, 0.5), (T, 1.0), (2 * T, 1.0)])
def test_progress_linear(step, expected):
    assert progress(step, T) == pytest.approx(expected)


def test_progress_cosine_shape():
    # (1 - cos(pi p)) / 2 at p = 1/4: slower than linear at the start, same midpoint and end.
    assert progress(T / 4, T, "cosine") == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert progress(T / 4, T, "cosine") < 0.25
    assert progress(T / 2, T, "cosine") == pytest.approx(0.5)
    assert progress(2 * T, T, "cosine") == pytest.approx(1.0)


def test_zero_anneal_steps_means_fully_annealed():
    assert progress(0, 0) == 1.0


@pytest.mark.parametrize("step, kappa_expected, rho_expected",
                         [(0, 1.0, 1.0), (T / 2, 0.55, 1.5), (T, 0.1, 2.0), (2 * T, 0.1, 2.0)])
def test_linear_schedule_paper_defaults(step, kappa_expected, rho_expected):
    cfg = ScheduleConfig()
    assert kappa(step, cfg) == pytest.approx(kappa_expected)
    assert rho(step, cfg) == pytest.approx(rho_expected)


@pytest.mark.parametrize("step, kappa_expected, rho_expected",
                         [(0, 1.0, 1.0), (T / 2, 0.55, 1.5), (T, 0.1, 2.0), (2 * T, 0.1, 2.0)])
def test_cosine_schedule_end_points(step, kappa_expected, rho_expected):
    cfg = ScheduleConfig(shape="cosine")
    assert kappa(step, cfg) == pytest.approx(kappa_expected)
    assert rho(step, cfg) == pytest.approx(rho_expected)


def test_cosine_quarter_point():
    p = (1 - math.cos(math.pi / 4)) / 2
    cfg = ScheduleConfig(shape="cosine")
    assert kappa(T / 4, cfg) == pytest.approx(1.0 - 0.9 * p)
    assert rho(T / 4, cfg) == pytest.approx(1.0 + p)


def test_kappa_floor_holds_when_min_is_above_the_line():
    # kappa_min > kappa_init: the max() floor wins from step 0.
    cfg = ScheduleConfig(kappa_init=0.05, kappa_min=0.1)
    assert kappa(0, cfg) == pytest.approx(0.1)


def test_no_annealing_is_constant_one():
    cfg = ScheduleConfig(anneal=False)
    for step in (0, T / 2, T, 10 * T):
        assert coefficients(step, "atod", cfg) == (1.0, 1.0)


def test_baseline_coefficients_ignore_the_schedule():
    for step in (0, T, 3 * T):
        assert coefficients(step, "opd") == (1.0, 0.0)
        assert coefficients(step, "grpo") == (0.0, 1.0)
    assert coefficients(T / 2, "atod") == pytest.approx((0.55, 1.5))


def test_bad_names_are_user_errors():
    with pytest.raises(UserError, match="atod, opd, grpo"):
        coefficients(0, "ppo")
    with pytest.raises(UserError, match="linear, cosine"):
        ScheduleConfig(shape="exp")
