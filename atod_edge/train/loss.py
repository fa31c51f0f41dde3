"""The clipped surrogate update (ATOD.md section 5) and the per-token log-prob helper.

    ratio_t = exp(logpi_theta(a_t) - lp_S(t))
    L = - agg_t min(ratio_t * A_t, clip(ratio_t, 1 - eps_clip, 1 + eps_clip) * A_t)

agg is the token mean over the batch's response tokens. No KL-to-reference term.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, in float32 (or float64 if given).

    logits: [..., vocab]; target_ids: [...] integer. Computed as logit - logsumexp, which is
    stable and never materialises the full log-softmax over the vocabulary.
    Causal LMs: pass logits[:, :-1] with target_ids = input_ids[:, 1:].
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # bf16/fp16 log-probs are too coarse for ratios near 1
    picked = logits.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def clipped_surrogate(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, eps_clip: float = 0.2,
                      num_tokens: float | torch.Tensor | None = None,
                      with_stats: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO/GRPO clipped surrogate with token-mean aggregation (section 5).

    new_logprobs: logpi_theta(a_t), with gradient; old_logprobs: lp_S(t) from the rollout;
    advantages: A_t (detached); mask: 1 for response tokens, 0 for prompt, observation and
    padding tokens (float weights are allowed). All four share one shape.
    num_tokens: the token-mean denominator; default mask.sum(). Pass the whole batch's count
    when the batch is split into micro-batches (gradient accumulation, DDP ranks) so the summed
    gradients equal those of one token mean over the batch.

    Returns (loss, stats) with stats: clip_fraction (share of response tokens whose ratio left
    [1 - eps_clip, 1 + eps_clip]), clip_active_fraction (share where the clip set the value,
    so the token had no gradient), mean_ratio, approx_kl (mean of old - new log-prob), as floats
    over the masked tokens of this call.
    """
    mask = mask.to(new_logprobs.dtype)
    advantages = advantages.detach()
    log_ratio = new_logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_clip) * advantages
    per_token = torch.minimum(unclipped, clipped)
    if num_tokens is None:
        num_tokens = mask.sum()
    denominator = torch.as_tensor(num_tokens, dtype=per_token.dtype, device=per_token.device).clamp(min=1)
    loss = -(per_token * mask).sum() / denominator
    if not with_stats:  # the stats cost host syncs (float()); hot loops skip them
        return loss, {}

    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        outside = ((ratio < 1.0 - eps_clip) | (ratio > 1.0 + eps_clip)).to(mask.dtype)
        active = (clipped < unclipped).to(mask.dtype)
        stats = {
            "clip_fraction": float((outside * mask).sum() / count),
            "clip_active_fraction": float((active * mask).sum() / count),
            "mean_ratio": float((ratio * mask).sum() / count),
            "approx_kl": float((-log_ratio * mask).sum() / count),
        }
    return loss, stats
