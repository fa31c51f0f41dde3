"""Advantages: GRPO per trajectory (ATOD.md section 1), OPD per token (section 2), and their
annealed mix (section 3).

Shapes: a batch is flat. Per-trajectory tensors are [num_trajectories]; per-token tensors are
any shape, usually [num_tokens] or padded [batch, seq]. Use `broadcast_to_tokens(values, index)` to spread
a per-trajectory value over its tokens. Every returned advantage is detached.
"""

from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_j r_j) / (std_j r_j + eps) over the rollouts j of i's group (section 1).

    rewards: [N] float, one episode reward per trajectory; group_ids: [N] integer, equal for the
    G rollouts of one task (any values, need not be contiguous).
    std is the sample standard deviation (Bessel's n - 1, as torch.std and the common GRPO
    implementations compute it). A group whose rewards are all equal, or that has one rollout,
    gets exactly 0: it carries no signal.
    """
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    device = rewards.device
    # One value per trajectory: cheap on CPU in float64 (which some accelerators lack).
    rewards = rewards.detach().cpu().to(torch.float64)
    _, group = torch.unique(group_ids.detach().cpu(), return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(
        0, group, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add_(0, group, rewards) / count
    centered = rewards - mean[group]
    sum_sq = torch.zeros_like(count).index_add_(0, group, centered * centered)
    std = (sum_sq / (count - 1).clamp(min=1)).sqrt()
    advantages = centered / (std[group] + eps)
    # Exact zeros for flat groups: the float mean of equal values can differ from them by an ulp.
    group_max = torch.full_like(count, -torch.inf).scatter_reduce(0, group, rewards, "amax")
    group_min = torch.full_like(count, torch.inf).scatter_reduce(0, group, rewards, "amin")
    no_signal = (group_max == group_min) | (count < 2)
    advantages = torch.where(no_signal[group], torch.zeros_like(advantages), advantages)
    return advantages.to(device=device, dtype=out_dtype)


def opd_advantages(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor,
                   token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """A_t = (lp_T(t) - lp_S(t)) * w_{k(t)} per token (section 2), detached.

    The single-sample estimate of the negative reverse KL at the sampled token: positive where
    the teacher likes the student's token more than the student does. token_weights are the
    T-DUR weights already spread over tokens (None means uniform, w = 1).
    """
    advantages = teacher_logprobs.detach() - student_logprobs.detach()
    if token_weights is not None:
        advantages = advantages * token_weights.detach()
    return advantages


def combine(opd_adv: torch.Tensor | None, grpo_adv_per_token: torch.Tensor | None,
            kappa: float, rho: float) -> torch.Tensor:
    """A_t = kappa * A_t^OPD + rho * A_i^GRPO (section 3), per token, detached.

    Either term may be None when its coefficient is 0 (GRPO needs no teacher; OPD no groups).
    """
    terms = []
    if opd_adv is not None:
        terms.append(kappa * opd_adv.detach())
    elif kappa != 0:
        raise ValueError("combine: opd_adv is None but kappa is not 0")
    if grpo_adv_per_token is not None:
        terms.append(rho * grpo_adv_per_token.detach())
    elif rho != 0:
        raise ValueError("combine: grpo_adv_per_token is None but rho is not 0")
    if not terms:
        raise ValueError("combine: both advantage terms are None")
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def broadcast_to_tokens(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Spread per-trajectory (or per-turn) values over tokens: out[t] = values[index[t]].

    index has the tokens' shape; entries < 0 mark tokens outside every response and get 0.
    """
    valid = index >= 0
    gathered = values[index.clamp(min=0)]
    return torch.where(valid, gathered, torch.zeros_like(gathered))


def grpo_signal_stats(env_rewards: torch.Tensor, rewards: torch.Tensor, success: torch.Tensor,
                      group_ids: torch.Tensor, token_advantages: torch.Tensor,
                      token_traj: torch.Tensor) -> dict[str, float]:
    """Where GRPO's signal comes from in one batch (ATOD.md section 6: the invalid-action penalty
    relative to the success reward). Per-step counts, summed over steps by the report.

    env_rewards: [N] the env's episode rewards; rewards: [N] the same minus the invalid penalty
    (what GRPO normalises); success: [N] bool; group_ids: [N]; token_advantages: [tokens]
    A^GRPO per trained token; token_traj: [tokens] the trajectory of each token.
    A group is all-fail when none of its rollouts succeeded, and penalty-only when its env
    rewards are all equal but its penalised rewards are not: its whole advantage then comes from
    the penalty. |A| is summed over tokens (what a token-mean update sees).
    """
    _, group = torch.unique(group_ids.detach().cpu(), return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0

    def spread(values: torch.Tensor) -> torch.Tensor:   # per group: max - min
        values = values.detach().cpu().to(torch.float64)
        high = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, group, values, "amax")
        low = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce(0, group, values, "amin")
        return high - low

    wins = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, success.detach().cpu().to(torch.float64))
    all_fail = wins == 0
    penalty_only = (spread(env_rewards) == 0) & (spread(rewards) > 0)
    traj_abs = torch.zeros(len(group), dtype=torch.float64).index_add_(
        0, token_traj.detach().cpu(), token_advantages.detach().cpu().abs().to(torch.float64))
    group_abs = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, traj_abs)
    return {"grpo_groups": float(num_groups), "grpo_all_fail_groups": float(all_fail.sum()),
            "grpo_penalty_only_groups": float(penalty_only.sum()),
            "grpo_all_fail_penalty_only_groups": float((all_fail & penalty_only).sum()),
            "grpo_abs_adv": float(group_abs.sum()), "grpo_abs_adv_all_fail": float(group_abs[all_fail].sum()),
            "grpo_abs_adv_all_fail_penalty_only": float(group_abs[all_fail & penalty_only].sum())}
