"""The step's batch: from scored episodes (rollout/, with the teacher's log-probs from scoring/)
to advantages for every response token, flattened for the update (update.py). The arithmetic is
schedule.py's coefficients, tdur.py's weights and advantages.py's OPD and GRPO terms (ATOD.md
sections 1-4); this module gathers the trainable turns and hands their tensors to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atod_edge.rollout.episode import Episode, Turn
from atod_edge.train.advantages import broadcast_to_tokens, combine, grpo_advantages, grpo_signal_stats, opd_advantages
from atod_edge.train.config import TrainConfig
from atod_edge.train.schedule import coefficients
from atod_edge.train.tdur import token_weights, turn_statistics


@dataclass
class TokenBatch:
    """The step's trainable turns and their tokens, flattened."""

    prompts: list[list[int]]          # per turn
    responses: list[list[int]]        # per turn
    token_offsets: list[int]          # per turn: start of its tokens in the flat tensors
    old_logprobs: torch.Tensor        # [tokens] lp_S
    advantages: torch.Tensor          # [tokens] A_t
    stats: dict[str, float]
    rollout_logprobs: torch.Tensor | None = None   # [tokens] the rollout engine's, where lp_S was recomputed
    loss_weights: torch.Tensor | None = None       # [tokens] per-token loss weights (TIS); None: all 1
    opd_term: torch.Tensor | None = None           # [tokens] kappa * A^OPD (None when kappa is 0)
    grpo_term: torch.Tensor | None = None          # [tokens] rho * A^GRPO (None when rho is 0); advantages is their sum


def trains_turn(turn: Turn, cfg: TrainConfig) -> bool:
    """Whether a turn's response tokens enter the update: it has some, and it is not a response
    cut at max_new_tokens under truncated_turns=mask."""
    return bool(turn.response_ids) and not (cfg.truncated_turns == "mask" and turn.truncated)


def episode_rewards(episodes: list[Episode], invalid_penalty: float) -> torch.Tensor:
    """r_i: the env's episode reward minus the invalid-action penalty per invalid turn."""
    return torch.tensor([ep.reward - invalid_penalty * ep.num_invalid for ep in episodes],
                        dtype=torch.float32)


def build_batch(episodes: list[Episode], cfg: TrainConfig, step: int, progress: float | None = None) -> TokenBatch:
    """Advantages for every response token (ATOD.md sections 1-4), and T-DUR values written
    back onto the turns (for the records and the TUI). progress: the schedule's p(s) when it is
    measured rather than the clock's (schedule.shape=adaptive)."""
    kappa, rho = coefficients(step, cfg.algo, cfg.schedule, progress)
    prompts, responses, offsets, where = [], [], [], []
    student_lp, teacher_lp, token_turn, turn_traj = [], [], [], []
    n_tokens = 0
    for e, ep in enumerate(episodes):
        for t, turn in enumerate(ep.turns):
            if not trains_turn(turn, cfg):
                continue
            k = len(prompts)
            prompts.append(turn.prompt_ids)
            responses.append(turn.response_ids)
            offsets.append(n_tokens)
            where.append((e, t))
            turn_traj.append(e)
            if turn.teacher_logprobs is None and kappa != 0:
                # silently using lp_S would zero the OPD term
                raise ValueError(f"episode {e} turn {t}: no teacher log-probs, but kappa={kappa}")
            student_lp += turn.student_logprobs
            teacher_lp += turn.teacher_logprobs if turn.teacher_logprobs is not None else turn.student_logprobs
            token_turn += [k] * len(turn.response_ids)
            n_tokens += len(turn.response_ids)
    lp_s = torch.tensor(student_lp, dtype=torch.float32)
    lp_t = torch.tensor(teacher_lp, dtype=torch.float32)
    turn_index = torch.tensor(token_turn, dtype=torch.long)
    traj_of_turn = torch.tensor(turn_traj, dtype=torch.long)

    weight_mode = "uniform" if cfg.algo == "opd" else cfg.weights
    level = "token" if weight_mode == "token" else "turn"
    mode = "tdur" if weight_mode == "token" else weight_mode
    weights = token_weights(lp_s, lp_t, turn_index, traj_of_turn, mode=mode, level=level)
    opd = opd_advantages(lp_t, lp_s, weights) if kappa != 0 else None
    grpo = None
    if rho != 0:
        rewards = episode_rewards(episodes, cfg.invalid_penalty)
        groups = torch.tensor([ep.group if ep.group is not None else i for i, ep in enumerate(episodes)])
        grpo = broadcast_to_tokens(grpo_advantages(rewards, groups), traj_of_turn[turn_index])
        grpo_stats = grpo_signal_stats(torch.tensor([ep.reward for ep in episodes]), rewards,
                                       torch.tensor([bool(ep.success) for ep in episodes]), groups, grpo,
                                       traj_of_turn[turn_index])
    advantages = combine(opd, grpo, kappa, rho)

    # T-DUR quantities per turn, for the records
    stats_per_turn = turn_statistics(lp_s, lp_t, turn_index, num_turns=len(prompts))
    per_turn_weight = weights[torch.tensor(offsets, dtype=torch.long)] if offsets else weights
    for k, (e, t) in enumerate(where):
        turn = episodes[e].turns[t]
        turn.disagreement = float(stats_per_turn.disagreement[k])
        turn.uncertainty = float(stats_per_turn.uncertainty[k])
        turn.weight = float(per_turn_weight[k]) if level == "turn" else None
    # the mean over turns (token-level weights: over tokens), not weighted by turn length
    mean_weight = per_turn_weight.mean() if level == "turn" else weights.mean()
    stats = {
        "kappa": kappa, "rho": rho, "tokens": n_tokens,
        "mean_turn_weight": float(mean_weight) if n_tokens else 0.0,
        "mean_abs_log_ratio": float((lp_t - lp_s).abs().mean()) if n_tokens else 0.0,
    }
    if progress is not None:
        stats["schedule_progress"] = progress
    if grpo is not None:   # all-fail groups and the penalty's share of the signal (ATOD.md section 6)
        stats.update(grpo_stats)
    return TokenBatch(prompts, responses, offsets, lp_s, advantages, stats,
                      opd_term=kappa * opd if opd is not None else None,
                      grpo_term=rho * grpo if grpo is not None else None)


def micro_batch_token_index(batch: TokenBatch, order: list[int], micro_batch: int, device) -> list[torch.Tensor]:
    """For each micro-batch of `order` (turn indices, micro_batch at a time), the positions of its
    turns' tokens in the batch's flat tensors: built on the host, copied to the device in one go."""
    groups = [order[m:m + micro_batch] for m in range(0, len(order), micro_batch)]
    pieces = [torch.cat([torch.arange(batch.token_offsets[k], batch.token_offsets[k] + len(batch.responses[k]))
                         for k in turns]) for turns in groups]
    if not pieces:
        return []
    flat = torch.cat(pieces)
    flat = flat.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else flat.to(device)
    return list(flat.split([len(p) for p in pieces]))
