"""Numerics of the update: compute precision, the rollout-vs-training log-prob mismatch and
truncated importance sampling. Pure functions; the trainer calls them.

Master weights. The trainable student is held in fp32 whatever its checkpoint's dtype: AdamW's
step at the recipes' lr 1e-6 is below bf16's resolution (8 bits of mantissa: a weight of 0.02
moves only by >= 6e-5), so bf16 weights would mostly not move. Compute runs in bf16 autocast
("bf16" precision; "auto" picks it on CUDA), under FSDP2 through a MixedPrecisionPolicy (bf16
parameters in the forward and backward, fp32 gradient reduction and fp32 shards). The frozen
teacher keeps its checkpoint's dtype on accelerators.

Old log-probs. The rollout engine's cached decode and the update's full forward take bf16 logits
through different kernels, so under bf16 the rollout's log-probs lp_rollout differ from the
update's own log-probs of the same weights. The trainer can recompute lp_old with the update's
forward before the first epoch (as verl does), so that the first ratio is exactly 1 and the
same forward gives lp_S in lp_T - lp_S. What remains is the rollout being sampled from a
slightly different distribution than pi_old; truncated importance sampling (TIS, Yao et al.
2025, as in verl and TRL) weights each token's loss by

    w_t = min(exp(lp_old(t) - lp_rollout(t)), C)

and the per-step mismatch |lp_old - lp_rollout| (mean, max) is logged either way.
"""

from __future__ import annotations

import torch

from atod_edge.engine.precision import PRECISIONS


def compute_precision(precision: str, device: str) -> str:
    """The precision a run computes in: "bf16" or "fp32" ("auto": bf16 on CUDA, fp32 elsewhere)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if str(device).startswith("cuda") else "fp32"
    return precision


def recomputes_old_logprobs(setting: str, precision: str) -> bool:
    """Config `recompute_old_logprobs` ("auto" | "always" | "never") for a run computing in
    `precision` ("bf16" | "fp32"): auto recomputes under bf16 only (in fp32 the rollout's
    log-probs equal the update forward's to ~1e-6, and recomputing costs a forward)."""
    if setting not in ("auto", "always", "never"):
        raise ValueError(f"recompute_old_logprobs '{setting}': expected auto, always or never")
    return setting == "always" or (setting == "auto" and precision == "bf16")


def logprob_mismatch(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor) -> dict[str, float]:
    """|lp_old - lp_rollout| over the batch's tokens: its mean and max (nats), and the mean of
    lp_old - lp_rollout (its sign shows a bias, not only noise)."""
    if old_logprobs.numel() == 0:
        return {"rollout_mismatch_mean": 0.0, "rollout_mismatch_max": 0.0, "rollout_mismatch_bias": 0.0}
    diff = old_logprobs.float() - rollout_logprobs.float()
    return {"rollout_mismatch_mean": float(diff.abs().mean()), "rollout_mismatch_max": float(diff.abs().max()),
            "rollout_mismatch_bias": float(diff.mean())}


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                         cap: float) -> tuple[torch.Tensor, float]:
    """TIS weights w_t = min(pi_old(a_t) / pi_rollout(a_t), cap) and the share of tokens the cap
    truncated. cap <= 0: no correction (all ones)."""
    if cap <= 0:
        return torch.ones_like(old_logprobs, dtype=torch.float32), 0.0
    ratio = torch.exp(old_logprobs.float() - rollout_logprobs.float())
    truncated = float((ratio > cap).float().mean()) if ratio.numel() else 0.0
    return ratio.clamp(max=cap), truncated


def fsdp_mixed_precision(precision: str):
    """The FSDP2 MixedPrecisionPolicy for a compute precision: bf16 parameters in forward and
    backward, gradients reduced in fp32 (the fp32 shards are the master weights); None for fp32."""
    if precision != "bf16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
