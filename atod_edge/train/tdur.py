"""T-DUR: turn-level disagreement-uncertainty reweighting of the OPD term (ATOD.md section 4).

For each turn k with N_k response tokens:
    d_k = mean_t |lp_S(t) - lp_T(t)|        disagreement
    h_k = mean_t (-lp_S(t))                 uncertainty (sampled surprisal)
min-max normalised over the turns of each trajectory (0.5 when max - min < 1e-8), fused by a
soft OR:  w_k = 1 - (1 - d~_k) * (1 - h~_k)  in [0, 1]. A one-turn trajectory gets 0.75.

Batch layout: token tensors (lp_S, lp_T, turn_index) share one shape, flat or padded.
turn_index[t] is the global id (0..num_turns-1, unique across the batch) of token t's turn, or
-1 for tokens outside every response (prompt, observations, padding), which are ignored.
traj_index_of_turn[k] is the trajectory id of turn k. All weights are detached.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from atod_edge.errors import UserError
from atod_edge.train.advantages import broadcast_to_tokens

MODES = ("tdur", "uniform", "disagreement", "uncertainty")
LEVELS = ("turn", "token")
FLAT_RANGE = 1e-8  # below this max - min spread a trajectory's values count as all equal


class TurnStatistics(NamedTuple):
    """Per-turn statistics, each [num_turns]; a turn without tokens has count 0 and d = h = 0."""

    disagreement: torch.Tensor
    uncertainty: torch.Tensor
    token_count: torch.Tensor


def turn_statistics(student_lp: torch.Tensor, teacher_lp: torch.Tensor, turn_index: torch.Tensor,
                    num_turns: int | None = None) -> TurnStatistics:
    """d_k and h_k: means of |lp_S - lp_T| and -lp_S over each turn's response tokens (section 4)."""
    student_lp = student_lp.detach().reshape(-1).float()
    teacher_lp = teacher_lp.detach().reshape(-1).float()
    turn_index = turn_index.reshape(-1)
    valid = turn_index >= 0
    turns = turn_index[valid]
    if num_turns is None:
        num_turns = int(turns.max()) + 1 if turns.numel() else 0
    zeros = torch.zeros(num_turns, dtype=torch.float32, device=student_lp.device)
    count = zeros.index_add(0, turns, torch.ones_like(student_lp[valid]))
    disagreement_sum = zeros.index_add(0, turns, (student_lp[valid] - teacher_lp[valid]).abs())
    surprisal_sum = zeros.index_add(0, turns, -student_lp[valid])
    denominator = count.clamp(min=1)
    return TurnStatistics(disagreement_sum / denominator, surprisal_sum / denominator, count)


def minmax_per_trajectory(values: torch.Tensor, traj_index: torch.Tensor,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
    """(v - min) / (max - min) over the entries of each trajectory; 0.5 where max - min < 1e-8.

    values and traj_index are 1-D and aligned (turns, or tokens for the token-level ablation).
    Entries with valid False (or traj_index < 0) are left out of min and max and get 0.5.
    """
    values = values.detach().float()
    keep = traj_index >= 0 if valid is None else valid & (traj_index >= 0)
    trajectory = traj_index.clamp(min=0)
    num_trajectories = int(trajectory.max()) + 1 if trajectory.numel() else 0
    inf = torch.tensor(torch.inf, device=values.device)
    lows = torch.full((num_trajectories,), torch.inf, device=values.device).scatter_reduce(
        0, trajectory, torch.where(keep, values, inf), "amin")
    highs = torch.full((num_trajectories,), -torch.inf, device=values.device).scatter_reduce(
        0, trajectory, torch.where(keep, values, -inf), "amax")
    low, spread = lows[trajectory], (highs - lows)[trajectory]
    flat = ~(spread >= FLAT_RANGE) | ~keep  # `~(>=)` also catches the nan/inf of empty trajectories
    normalised = (values - low) / torch.where(flat, torch.ones_like(spread), spread)
    return torch.where(flat, torch.full_like(values, 0.5), normalised)


def fuse(disagreement_norm: torch.Tensor, uncertainty_norm: torch.Tensor, mode: str = "tdur") -> torch.Tensor:
    """Combine normalised signals into weights: soft OR (tdur), 1 (uniform), or one signal alone."""
    if mode == "tdur":
        return 1.0 - (1.0 - disagreement_norm) * (1.0 - uncertainty_norm)
    if mode == "uniform":
        return torch.ones_like(disagreement_norm)
    if mode == "disagreement":
        return disagreement_norm
    if mode == "uncertainty":
        return uncertainty_norm
    raise UserError(f"turn weight mode '{mode}' is unknown; choose one of {', '.join(MODES)}")


def turn_weights(d: torch.Tensor, h: torch.Tensor, traj_index: torch.Tensor, mode: str = "tdur",
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """w_k per turn (section 4): min-max normalise d and h within each trajectory, then fuse.

    traj_index: [num_turns] trajectory of each turn; valid: optional [num_turns] bool, False for
    turns without tokens (e.g. token_count > 0 from turn_statistics) so they do not set the range.
    """
    if mode == "uniform":
        return torch.ones_like(d, dtype=torch.float32)
    return fuse(minmax_per_trajectory(d, traj_index, valid), minmax_per_trajectory(h, traj_index, valid), mode)


def token_level_weights(student_lp: torch.Tensor, teacher_lp: torch.Tensor, traj_index_of_token: torch.Tensor,
                        mode: str = "tdur") -> torch.Tensor:
    """Token-level ablation: the same normalise + fuse, with d_t = |lp_S - lp_T| and h_t = -lp_S
    per token, normalised over the response tokens of each trajectory.

    Returns the tokens' shape; tokens with traj_index_of_token < 0 get 0.
    """
    shape = traj_index_of_token.shape
    student_lp = student_lp.detach().reshape(-1).float()
    teacher_lp = teacher_lp.detach().reshape(-1).float()
    trajectory = traj_index_of_token.reshape(-1)
    disagreement = (student_lp - teacher_lp).abs()
    uncertainty = -student_lp
    if mode == "uniform":
        weights = torch.ones_like(disagreement)
    else:
        weights = fuse(minmax_per_trajectory(disagreement, trajectory),
                       minmax_per_trajectory(uncertainty, trajectory), mode)
    return torch.where(trajectory >= 0, weights, torch.zeros_like(weights)).reshape(shape)


def token_weights(student_lp: torch.Tensor, teacher_lp: torch.Tensor, turn_index: torch.Tensor,
                  traj_index_of_turn: torch.Tensor, mode: str = "tdur", level: str = "turn") -> torch.Tensor:
    """The OPD weight of every token in one call: T-DUR turn weights spread over their tokens
    (level="turn", the paper's method) or the token-level ablation (level="token").

    Returns turn_index's shape; tokens outside every response (turn_index < 0) get 0.
    """
    num_turns = traj_index_of_turn.numel()
    if level == "turn":
        stats = turn_statistics(student_lp, teacher_lp, turn_index, num_turns)
        weights = turn_weights(stats.disagreement, stats.uncertainty, traj_index_of_turn, mode,
                               valid=stats.token_count > 0)
        return broadcast_to_tokens(weights, turn_index)
    if level == "token":
        traj_index_of_token = broadcast_to_tokens(traj_index_of_turn, turn_index)
        traj_index_of_token = torch.where(turn_index >= 0, traj_index_of_token, -1)
        return token_level_weights(student_lp, teacher_lp, traj_index_of_token, mode)
    raise UserError(f"turn weight level '{level}' is unknown; choose one of {', '.join(LEVELS)}")
