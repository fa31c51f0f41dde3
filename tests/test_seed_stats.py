"""benchmarks/seed_stats.py: seed-level inference for the grid's paired claims."""

from __future__ import annotations

import math

import numpy as np
from bench_loader import load_benchmark

stats = load_benchmark("seed_stats")


def test_t_interval_matches_the_textbook_formula():
    values = np.array([0.12, -0.065, -0.035])        # the grid's ATOD - OPD per seed
    t = stats.t_interval(values)
    sd = float(np.std(values, ddof=1))
    assert math.isclose(t["mean"], values.mean())
    assert math.isclose(t["ci95"][1] - t["mean"], 4.303 * sd / math.sqrt(3), rel_tol=1e-9)
    assert stats.t_interval(np.array([0.1]))["ci95"] is None


def test_t_quantiles_beyond_the_table_approach_the_normal():
    assert abs(stats.t_quantile(0.975, 200) - 1.972) < 2e-3
    assert abs(stats.t_quantile(0.80, 200) - 0.843) < 2e-3
    assert stats.t_quantile(0.975, 11) < stats.t_quantile(0.975, 10)


def test_min_detectable_effect_shrinks_with_seeds():
    three = stats.min_detectable_effect(0.08, 3)
    assert math.isclose(three, (4.303 + 1.061) * 0.08 / math.sqrt(3))
    assert stats.min_detectable_effect(0.08, 10) < three / 2
    assert stats.min_detectable_effect(None, 1) is None


def test_hierarchical_bootstrap_is_wider_than_tasks_only_when_seeds_disagree():
    rng = np.random.default_rng(1)
    tasks = 200
    # three seeds whose mean differences disagree (+20, -10, +5 points), noise per task
    diffs = np.stack([np.clip(rng.normal(m, 0.3, tasks), -1, 1) for m in (0.2, -0.1, 0.05)])
    hier = stats.hierarchical_bootstrap([diffs], resamples=2000)
    per_task = diffs.mean(axis=0)
    boot = [per_task[rng.integers(0, tasks, tasks)].mean() for _ in range(2000)]
    task_width = np.percentile(boot, 97.5) - np.percentile(boot, 2.5)
    assert hier[1] - hier[0] > 2 * task_width
    assert hier[0] < diffs.mean() < hier[1]


def test_seed_verdicts():
    assert stats.seed_verdict([0.01, 0.05], 0.03) == "holds"
    assert stats.seed_verdict([-0.05, -0.01], 0.03) == "fails"
    # spans zero and the design cannot see the paper's 2-point effect
    assert stats.seed_verdict([-0.2, 0.1], 0.25) == "not testable with this design"
    # spans zero though the design could see a 2-point effect: a real null-ish result
    assert stats.seed_verdict([-0.01, 0.01], 0.015) == "inconclusive"
    assert stats.seed_verdict(None, None).startswith("not testable")


def test_seed_level_on_agreeing_seeds_holds():
    diffs = np.stack([np.full(50, v) for v in (0.20, 0.22, 0.21)])
    out = stats.seed_level([diffs], resamples=500)
    assert out["seed_verdict"] == "holds" and out["seeds_n"] == 3
    assert out["seed_ci95"][0] > 0.15 and out["mde80"] < 0.1
