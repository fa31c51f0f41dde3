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

import math
from dataclasses import dataclass

from atod_edge.errors import UserError

SHAPES = ("linear", "cosine", "adaptive")
SIGNALS = ("success", "disagreement")
ALGOS = ("atod", "opd", "grpo")


@dataclass(frozen=True)
class ScheduleConfig:
    """Schedule parameters; defaults are the paper's (T = 80 steps, kappa 1 -> 0.1, rho 1 -> 2).

    anneal=False holds kappa = kappa_init and rho = rho_init for every step (the
    "ATOD without annealing" ablation: kappa = rho = 1 with the defaults).
    """

    anneal_steps: int = 80
    kappa_init: float = 1.0
    kappa_min: float = 0.1
    rho_init: float = 1.0
    rho_max: float = 2.0
    shape: str = "linear"
    anneal: bool = True
    # adaptive shape only (see the module docstring)
    signal: str = "success"
    teacher_success: float = 0.0     # SR_T; 0: unknown (the success signal then needs it set)
    target: float = 1.0              # c
    smoothing: float = 0.7           # beta
    plateau_tol: float = 0.02        # tol

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise UserError(f"schedule shape '{self.shape}' is unknown; choose one of {', '.join(SHAPES)}")
        if self.anneal_steps < 0:
            raise UserError(f"schedule anneal_steps must be >= 0, got {self.anneal_steps}")
        if self.signal not in SIGNALS:
            raise UserError(f"schedule signal '{self.signal}' is unknown; choose one of {', '.join(SIGNALS)}")
        if not self.target > 0:
            raise UserError(f"schedule target must be > 0, got {self.target}")
        if not 0.0 <= self.smoothing < 1.0:
            raise UserError(f"schedule smoothing must be in [0, 1), got {self.smoothing}")
        if self.shape == "adaptive" and self.anneal and self.signal == "success" and self.teacher_success <= 0:
            raise UserError("schedule shape 'adaptive' with signal 'success' needs the teacher's success rate: "
                            "set schedule.teacher_success (in (0, 1]), or use schedule.signal=disagreement")


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
