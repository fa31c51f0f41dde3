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


# --- the adaptive shape: p(s) from hand-made metric sequences ------------------------------

from atod_edge.train.schedule import AdaptiveProgress  # noqa: E402


def adaptive(**kw) -> ScheduleConfig:
    return ScheduleConfig(shape="adaptive", **kw)


def test_adaptive_success_follows_the_smoothed_ratio_to_the_teacher():
    cfg = adaptive(teacher_success=0.5, smoothing=0.5)
    state = AdaptiveProgress(cfg)
    assert state.p == 0.0                       # p(0) = 0: nothing measured yet
    # q: 0.1 (first value), 0.5*0.1 + 0.5*0.3 = 0.2, 0.5*0.2 + 0.5*0.6 = 0.4; p = q / 0.5
    assert [state.observe(s, 9.0) for s in (0.1, 0.3, 0.6)] == pytest.approx([0.2, 0.4, 0.8])
    # a bad step lowers q (0.5*0.4 + 0 = 0.2) but p never goes back
    assert state.observe(0.0, 9.0) == pytest.approx(0.8)
    # the student passes the teacher: p is capped at 1, kappa at its floor
    for _ in range(10):
        state.observe(1.0, 9.0)
    assert state.p == 1.0
    assert coefficients(5, "atod", cfg, state.p) == pytest.approx((0.1, 2.0))


def test_adaptive_success_target_scales_the_teacher_rate():
    # c = 0.5: the teacher is fully retired once the student reaches half its success
    state = AdaptiveProgress(adaptive(teacher_success=0.8, target=0.5, smoothing=0.0))
    assert state.observe(0.2, 0.0) == pytest.approx(0.5)
    assert state.observe(0.4, 0.0) == pytest.approx(1.0)


def test_adaptive_coefficients_use_the_given_progress_not_the_step():
    cfg = adaptive(teacher_success=0.5)
    # step 1000 would be fully annealed on the clock; p = 0.5 is halfway
    assert coefficients(1000, "atod", cfg, 0.5) == pytest.approx((0.55, 1.5))
    assert coefficients(0, "atod", cfg, 0.0) == pytest.approx((1.0, 1.0))
    assert coefficients(3, "opd", cfg, 0.9) == (1.0, 0.0)
    with pytest.raises(ValueError, match="AdaptiveProgress"):
        kappa(3, cfg)                            # no p: the clock has no meaning here


def test_adaptive_disagreement_counts_only_plateaued_steps():
    cfg = adaptive(signal="disagreement", anneal_steps=4, smoothing=0.0, plateau_tol=0.1)
    state = AdaptiveProgress(cfg)
    # the gap shrinks fast (each step > 10% below the best): the clock stays paused
    assert [state.observe(0.0, m) for m in (2.0, 1.5, 1.0)] == [0.0, 0.0, 0.0]
    # 0.95 is only 5% below the best 1.0: a plateaued step, n = 1 of T = 4
    assert state.observe(0.0, 0.95) == pytest.approx(0.25)
    # rising is plateaued too; a real drop again (0.5 < 0.9 * 0.95) pauses the clock
    assert state.observe(0.0, 1.2) == pytest.approx(0.5)
    assert state.observe(0.0, 0.5) == pytest.approx(0.5)
    for _ in range(5):
        state.observe(0.0, 0.5)
    assert state.p == 1.0 and state.plateau_steps >= 4


def test_adaptive_disagreement_smoothing():
    # beta = 0.5: D = 1.0, 0.75 (falls 25%), 0.7 (falls 6.7% < 10%: plateaued)
    state = AdaptiveProgress(adaptive(signal="disagreement", anneal_steps=2, smoothing=0.5, plateau_tol=0.1))
    assert [state.observe(0.0, m) for m in (1.0, 0.5, 0.65)] == pytest.approx([0.0, 0.0, 0.5])
    assert state.smoothed == pytest.approx(0.7)


def test_adaptive_state_replays_from_metrics_rows():
    cfg = adaptive(teacher_success=0.5, smoothing=0.5)
    rows = [{"step": 0, "success": 0.1, "mean_abs_log_ratio": 1.0},
            {"step": 0, "eval_success": 0.9},       # an eval row: not a training step
            {"step": 1, "success": 0.3, "mean_abs_log_ratio": 0.8},
            {"step": 2, "success": 0.6, "mean_abs_log_ratio": 0.7}]
    assert AdaptiveProgress.replay(cfg, rows).p == pytest.approx(0.8)
    assert AdaptiveProgress.replay(cfg, rows, before_step=2).p == pytest.approx(0.4)
    assert AdaptiveProgress.replay(cfg, list(reversed(rows))).p == pytest.approx(0.8)


def test_adaptive_success_needs_the_teacher_rate():
    with pytest.raises(UserError, match="teacher_success"):
        ScheduleConfig(shape="adaptive")
    with pytest.raises(UserError, match="signal"):
        ScheduleConfig(shape="adaptive", signal="vibes")
    ScheduleConfig(shape="adaptive", signal="disagreement")   # needs no teacher rate
