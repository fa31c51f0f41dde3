"""Seed-level inference for the grid's paired claims (beside compare_report's task bootstrap).

compare_report.paired_bootstrap resamples tasks only: it says how much the estimate would move with
other tasks, not with other training seeds. A training run is one draw of a noisy process, and with
3 seeds the spread between seeds is usually larger than the spread between task draws. This module
treats the seed as the unit:

- `t_interval`: the mean of the per-seed paired differences with its 95% Student-t interval
  (n seeds, n - 1 degrees of freedom);
- `hierarchical_bootstrap`: resample seeds with replacement, then tasks within each drawn seed,
  and average: the percentile interval covers both sources of noise;
- `min_detectable_effect`: the smallest true difference this many seeds detect with 80% power at
  two-sided alpha 0.05, (t_0.975 + t_0.80) * sd / sqrt(n), from the observed seed spread;
- `seed_verdict`: holds / fails when the seed-level t interval excludes the threshold; otherwise
  "not testable with this design" when the design's minimum detectable effect exceeds the effect
  the paper reports (ATOD.md's 2-7 points), else "inconclusive".

A claim whose seeds all agree but whose seed-level interval spans zero is not refuted: with n = 3
the t quantile is 4.30, and the verdict says what the design can and cannot see.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from atod_edge.evaluate.evaluate import t_quantile_975

# Student t 0.80 quantiles for 1..10 degrees of freedom (beyond: Cornish-Fisher around the normal's
# 0.8416); the 0.975 ones come from atod_edge.evaluate.evaluate.t_quantile_975, as the job's intervals do
T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879)
Z80 = 0.841621
PAPER_EFFECT = 0.02     # the smallest effect ATOD.md section 7 reports (2 points; its effects are 2-7)
BOOTSTRAP_RESAMPLES = 10_000


def t_quantile(p: float, df: int) -> float:
    """The p quantile (p = 0.975 or 0.80) of Student's t with df degrees of freedom."""
    if p == 0.975:
        return t_quantile_975(df)
    if p != 0.80:
        raise ValueError(f"t_quantile: p must be 0.975 or 0.80, got {p}")
    if df < 1:
        return float("nan")
    if df <= len(T80):
        return T80[df - 1]
    z = Z80
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def per_seed(diffs: list[np.ndarray]) -> np.ndarray:
    """The paired difference of each seed, averaged over envs: diffs holds one [seeds, tasks] array
    per env (a - b per task, paired by seed)."""
    seeds = min(d.shape[0] for d in diffs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # NaN cells (no value, e.g. turns of a lost episode)
        return np.array([np.mean([np.nanmean(d[i]) for d in diffs]) for i in range(seeds)])


def t_interval(values: np.ndarray) -> dict:
    """Mean of per-seed values, their sample sd and the 95% t interval (None with one seed)."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return {"mean": mean, "sd": None, "ci95": None, "n": n}
    sd = float(np.std(values, ddof=1))
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "n": n}


def hierarchical_bootstrap(diffs: list[np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = 0) -> list[float]:
    """95% percentile interval: each resample draws seeds with replacement, then tasks with
    replacement within every drawn seed and env, and averages over envs, seeds and tasks."""
    rng = np.random.default_rng(seed)
    seeds = min(d.shape[0] for d in diffs)
    boot = np.zeros(resamples)
    for d in diffs:
        drawn_seeds = rng.integers(0, seeds, size=(resamples, seeds))
        tasks = d.shape[1]
        drawn_tasks = rng.integers(0, tasks, size=(resamples, seeds, tasks))
        values = d[drawn_seeds[:, :, None], drawn_tasks]          # [resamples, seeds, tasks]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            boot += np.nanmean(values, axis=(1, 2))   # NaN cells (no value) are left out
    boot /= len(diffs)
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    return [float(low), float(high)]


def min_detectable_effect(sd: float | None, n: int) -> float | None:
    """Smallest true difference detected with 80% power (two-sided alpha 0.05) by a paired
    t-test over n seeds whose differences spread with standard deviation sd."""
    if sd is None or n < 2:
        return None
    return (t_quantile(0.975, n - 1) + t_quantile(0.80, n - 1)) * sd / math.sqrt(n)


def seed_verdict(ci95: list[float] | None, mde: float | None, threshold: float = 0.0,
                 paper_effect: float | None = PAPER_EFFECT) -> str:
    """paper_effect None: the paper reports no effect size on this scale (turns), so an interval
    that spans the threshold is inconclusive, never "not testable"."""
    if ci95 is None:
        return "not testable with this design (one seed)"
    low, high = ci95
    if low > threshold:
        return "holds"
    if high < threshold:
        return "fails"
    if mde is not None and paper_effect is not None and mde > paper_effect:
        return "not testable with this design"
    return "inconclusive"


NO_SIGNAL = "not testable here (no model on either side solves a task of this split)"


def seed_level(diffs: list[np.ndarray], threshold: float = 0.0, resamples: int = BOOTSTRAP_RESAMPLES,
               paper_effect: float | None = PAPER_EFFECT) -> dict:
    """Everything the report prints at the seed level for one claim."""
    values = per_seed(diffs)
    t = t_interval(values)
    mde = min_detectable_effect(t["sd"], t["n"])
    return {"seed_mean": t["mean"], "seed_sd": t["sd"], "seed_ci95": t["ci95"], "seeds_n": t["n"],
            "hier_ci95": hierarchical_bootstrap(diffs, resamples), "mde80": mde,
            "seed_verdict": seed_verdict(t["ci95"], mde, threshold, paper_effect)}
