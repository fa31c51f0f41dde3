"""The annealed coefficient schedule (ATOD.md section 3) and the baselines' fixed coefficients
(section 8).

    p(s)     = min(s / T, 1)
    kappa(s) = max(kappa_min, kappa_init - (kappa_init - kappa_min) * p(s))
    rho(s)   = rho_init + (rho_max - rho_init) * p(s)

kappa scales the OPD advantage, rho the GRPO advantage. A cosine shape replaces p(s) with
(1 - cos(pi * p(s))) / 2: same end points, slower at both ends.

The adaptive shape (an option beside the paper's clock, after RetireOPD, ATOD.md section 9)
keeps kappa(s) and rho(s) as above but lets a measured signal move p(s) instead of the step
count. p(0) = 0 and p(s) uses only steps s' < s (measured before step s's update), and never
decreases: a teacher once retired stays retired. Two signals:

  success (the student catches up with its teacher):
      q(s) = beta * q(s-1) + (1 - beta) * SR_S(s-1)          q(1) = SR_S(0)
      p(s) = max(p(s-1), min(q(s) / (c * SR_T), 1))
    SR_S(s) is the success rate of step s's rollouts, SR_T the teacher's success rate (the zoo
    card's measured evaluation, or schedule.teacher_success), c = schedule.target (1: retire the
    teacher fully when the student matches it), beta = schedule.smoothing.

  disagreement (OPD has stopped closing the gap):
      m(s)  = mean over the step's response tokens of |lp_T(t) - lp_S(t)|
      D(s)  = beta * D(s-1) + (1 - beta) * m(s-1)             D(1) = m(0)
      n(s)  = n(s-1) + [D(s) > (1 - tol) * min_{s' < s} D(s')] n(0) = n(1) = 0
      p(s)  = min(n(s) / T, 1)
    the paper's clock, paused at every step where the smoothed disagreement still fell by more
    than the fraction tol = schedule.plateau_tol of its best value so far.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from atod_edge.config import opt
from atod_edge.errors import ConfigError, UserError

SHAPES = ("linear", "cosine", "adaptive")
SIGNALS = ("success", "disagreement")
ALGOS = ("atod", "opd", "grpo")


@dataclass(frozen=True)
class ScheduleConfig:
    """Schedule parameters, the `schedule:` keys of a training recipe (TrainConfig.schedule);
    defaults are the paper's (T = 80 steps, kappa 1 -> 0.1, rho 1 -> 2).

    anneal=False holds kappa = kappa_init and rho = rho_init for every step (the
    "ATOD without annealing" ablation: kappa = rho = 1 with the defaults).
    """

    anneal: bool = opt(True, "anneal kappa/rho (false: constant kappa_init/rho_init, the no-annealing ablation)")
    anneal_steps: int = opt(80, "T: steps over which kappa decays and rho rises (paper: 80 of 150)", min=0)
    kappa_init: float = opt(1.0, "OPD coefficient at step 0", min=0.0)
    kappa_min: float = opt(0.1, "OPD coefficient floor", min=0.0)
    rho_init: float = opt(1.0, "GRPO coefficient at step 0", min=0.0)
    rho_max: float = opt(2.0, "GRPO coefficient after T steps", min=0.0)
    shape: str = opt("linear", "annealing shape: linear | cosine (the clock p = s/T) | adaptive (p moved by a "
                     "measured signal, see train/schedule.py)", choices=list(SHAPES))
    # adaptive shape only (see the module docstring)
    signal: str = opt("success", "adaptive: success (the student's rollout success over the teacher's) | "
                      "disagreement (T counts only the steps where mean |lp_T - lp_S| stopped falling)",
                      choices=list(SIGNALS))
    # SR_T; 0: unknown (the success signal then needs it set)
    teacher_success: float = opt(0.0, "adaptive, signal success: SR_T, the teacher's success rate (e.g. from "
                                 "its zoo card)", min=0.0, max=1.0)
    target: float = opt(1.0, "adaptive, signal success: the teacher is fully retired at student success "
                        "target * teacher_success", min=0.01)   # c
    smoothing: float = opt(0.7, "adaptive: EMA factor beta of the signal (0: no smoothing)", min=0.0, max=0.99)
    plateau_tol: float = opt(0.02, "adaptive, signal disagreement: a step counts when the smoothed "
                             "disagreement fell by less than this fraction of its best", min=0.0, max=1.0)  # tol

    def __post_init__(self) -> None:
        """The schedule's one validation, for a recipe (load_config builds this class from the
        `schedule:` keys) and a direct construction alike: each field's choices and bounds as
        declared above, then the rule across fields. A ConfigError (a UserError) names the key."""
        for f in dataclasses.fields(self):
            key, value = f"schedule.{f.name}", getattr(self, f.name)
            choices, lo, hi = f.metadata["choices"], f.metadata["min"], f.metadata["max"]
            if choices is not None and value not in choices:
                raise ConfigError(f"config key '{key}': got {value!r}, allowed: {', '.join(choices)}")
            if lo is not None and not value >= lo:
                raise ConfigError(f"config key '{key}': got {value!r}, must be >= {lo}")
            if hi is not None and not value <= hi:
                raise ConfigError(f"config key '{key}': got {value!r}, must be <= {hi}")
        if self.shape == "adaptive" and self.signal == "success" and not self.teacher_success > 0:
            raise ConfigError("config key 'schedule.teacher_success': schedule.shape=adaptive with "
                              "signal=success needs the teacher's success rate in (0, 1] "
                              "(or use schedule.signal=disagreement)")


def progress(step: float, anneal_steps: float, shape: str = "linear") -> float:
    """p(s) = min(s / T, 1) in [0, 1] (ATOD.md section 3); cosine maps it to (1 - cos(pi p)) / 2.

    anneal_steps = 0 means "already annealed": p = 1 from step 0.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    linear = 1.0 if anneal_steps <= 0 else min(step / anneal_steps, 1.0)
    if shape == "linear":
        return linear
    if shape == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * linear))
    if shape == "adaptive":
        raise ValueError("adaptive progress comes from AdaptiveProgress (a measured signal), not the step")
    raise UserError(f"schedule shape '{shape}' is unknown; choose one of {', '.join(SHAPES)}")


def kappa(step: float, cfg: ScheduleConfig = ScheduleConfig(), p: float | None = None) -> float:
    """OPD coefficient kappa(s), decaying from kappa_init to the floor kappa_min (section 3).
    p: the progress to use instead of the clock's (the adaptive shape's AdaptiveProgress.p)."""
    if not cfg.anneal:
        return cfg.kappa_init
    p = _progress_of(step, cfg, p)
    return max(cfg.kappa_min, cfg.kappa_init - (cfg.kappa_init - cfg.kappa_min) * p)


def rho(step: float, cfg: ScheduleConfig = ScheduleConfig(), p: float | None = None) -> float:
    """GRPO coefficient rho(s), rising from rho_init to rho_max and held there (section 3)."""
    if not cfg.anneal:
        return cfg.rho_init
    p = _progress_of(step, cfg, p)
    return cfg.rho_init + (cfg.rho_max - cfg.rho_init) * p


def _progress_of(step: float, cfg: ScheduleConfig, p: float | None) -> float:
    if p is not None:
        return min(max(p, 0.0), 1.0)
    return progress(step, cfg.anneal_steps, cfg.shape)


def coefficients(step: float, algo: str = "atod", cfg: ScheduleConfig = ScheduleConfig(),
                 p: float | None = None) -> tuple[float, float]:
    """(kappa, rho) at `step` for one algorithm of the shared code path (ATOD.md section 8).

    atod: the annealed schedule of `cfg` (or constant init values when cfg.anneal is False),
    at progress `p` when given (the adaptive shape), else at the clock's p(step);
    opd:  (1, 0), pure on-policy distillation; grpo: (0, 1), pure RL. cfg is ignored for both.
    """
    if algo == "atod":
        return kappa(step, cfg, p), rho(step, cfg, p)
    if algo == "opd":
        return 1.0, 0.0
    if algo == "grpo":
        return 0.0, 1.0
    raise UserError(f"algorithm '{algo}' is unknown; choose one of {', '.join(ALGOS)}")


class AdaptiveProgress:
    """p(s) of the adaptive shape (the module docstring's rule), fed one step's measurements at a
    time. `p` is the progress for the next step; `observe` takes the step just done. Its state is
    a function of the measurements alone, so a resumed run rebuilds it from metrics.jsonl
    (`replay`) and continues exactly where it stopped. Under torchrun the trainer feeds it the
    step's success over all ranks but each rank's own mean |lp_T - lp_S|: with the disagreement
    signal, ranks can disagree on p (not yet reduced across ranks)."""

    def __init__(self, cfg: ScheduleConfig):
        if cfg.shape != "adaptive":
            raise ValueError(f"AdaptiveProgress needs shape 'adaptive', got '{cfg.shape}'")
        self.cfg = cfg
        self.p = 0.0
        self.smoothed: float | None = None   # q (success) or D (disagreement)
        self.best: float | None = None       # min over earlier D
        self.plateau_steps = 0               # n

    def observe(self, success: float, disagreement: float) -> float:
        """Take step s's rollout success rate SR_S(s) and mean |lp_T - lp_S| m(s); returns p(s+1)."""
        cfg = self.cfg
        value = success if cfg.signal == "success" else disagreement
        if not math.isfinite(value):
            return self.p                    # a step without the measurement leaves p where it was
        beta = cfg.smoothing
        self.smoothed = value if self.smoothed is None else beta * self.smoothed + (1 - beta) * value
        if cfg.signal == "success":
            self.p = max(self.p, min(self.smoothed / (cfg.target * cfg.teacher_success), 1.0))
            return self.p
        if self.best is not None and self.smoothed > (1 - cfg.plateau_tol) * self.best:
            self.plateau_steps += 1
        self.best = self.smoothed if self.best is None else min(self.best, self.smoothed)
        self.p = 1.0 if cfg.anneal_steps <= 0 else min(self.plateau_steps / cfg.anneal_steps, 1.0)
        return self.p

    @classmethod
    def replay(cls, cfg: ScheduleConfig, rows: list[dict], before_step: int | None = None) -> "AdaptiveProgress":
        """The state after the training steps recorded in `rows` (metrics.jsonl rows carrying
        "success" and "mean_abs_log_ratio"), in step order, up to `before_step` (exclusive)."""
        state = cls(cfg)
        steps = {}
        for row in rows:
            if isinstance(row.get("step"), int) and "success" in row and "mean_abs_log_ratio" in row:
                steps[row["step"]] = row
        for step in sorted(steps):
            if before_step is not None and step >= before_step:
                break
            state.observe(float(steps[step]["success"]), float(steps[step]["mean_abs_log_ratio"]))
        return state
