"""The annealed coefficient schedule (ATOD.md section 3) and the baselines' fixed coefficients
(section 8).

    p(s)     = min(s / T, 1)
    kappa(s) = max(kappa_min, kappa_init - (kappa_init - kappa_min) * p(s))
    rho(s)   = rho_init + (rho_max - rho_init) * p(s)

kappa scales the OPD advantage, rho the GRPO advantage. A cosine shape replaces p(s) with
(1 - cos(pi * p(s))) / 2: same end points, slower at both ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from atod_edge.errors import UserError

SHAPES = ("linear", "cosine")
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

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise UserError(f"schedule shape '{self.shape}' is unknown; choose one of {', '.join(SHAPES)}")
        if self.anneal_steps < 0:
            raise UserError(f"schedule anneal_steps must be >= 0, got {self.anneal_steps}")


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
    raise UserError(f"schedule shape '{shape}' is unknown; choose one of {', '.join(SHAPES)}")


def kappa(step: float, cfg: ScheduleConfig = ScheduleConfig()) -> float:
    """OPD coefficient kappa(s), decaying from kappa_init to the floor kappa_min (section 3)."""
    if not cfg.anneal:
        return cfg.kappa_init
    p = progress(step, cfg.anneal_steps, cfg.shape)
    return max(cfg.kappa_min, cfg.kappa_init - (cfg.kappa_init - cfg.kappa_min) * p)


def rho(step: float, cfg: ScheduleConfig = ScheduleConfig()) -> float:
    """GRPO coefficient rho(s), rising from rho_init to rho_max and held there (section 3)."""
    if not cfg.anneal:
        return cfg.rho_init
    p = progress(step, cfg.anneal_steps, cfg.shape)
    return cfg.rho_init + (cfg.rho_max - cfg.rho_init) * p


def coefficients(step: float, algo: str = "atod", cfg: ScheduleConfig = ScheduleConfig()) -> tuple[float, float]:
    """(kappa, rho) at `step` for one algorithm of the shared code path (ATOD.md section 8).

    atod: the annealed schedule of `cfg` (or constant init values when cfg.anneal is False);
    opd:  (1, 0), pure on-policy distillation; grpo: (0, 1), pure RL. cfg is ignored for both.
    """
    if algo == "atod":
        return kappa(step, cfg), rho(step, cfg)
    if algo == "opd":
        return 1.0, 0.0
    if algo == "grpo":
        return 0.0, 1.0
    raise UserError(f"algorithm '{algo}' is unknown; choose one of {', '.join(ALGOS)}")
