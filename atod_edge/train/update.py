"""The policy update: from a TokenBatch (batch.py) to new student weights. The clipped surrogate
(loss.py) over micro-batches, gradients summed across ranks (distributed.py), one optimizer step
per PPO epoch. Before it, the optional recompute of the old log-probs lp_S with the update's own
forward, and the truncated-importance weights that correct for the rollout engine's numerics
(the numerics are in precision.py). The log-prob forwards are scoring/'s, with gradients.
"""

from __future__ import annotations

import math

import torch

from atod_edge.rollout.episode import Episode
from atod_edge.train.batch import TokenBatch, micro_batch_token_index, trains_turn
from atod_edge.train.config import TrainConfig
from atod_edge.train.distributed import DistInfo, all_reduce_max, all_reduce_max_tensor, all_reduce_sum
from atod_edge.train.loss import clipped_surrogate
from atod_edge.train.precision import compute_precision, truncated_is_weights


def update(student, optimizer, batch: TokenBatch, cfg: TrainConfig, info: DistInfo, pad_id: int,
           fsdp: bool = False, grad_terms: bool = False) -> dict:
    """ppo_epochs passes of the clipped surrogate over the batch in micro-batches, then one
    optimizer step per pass. Losses stay on the device until the end (no host sync per
    micro-batch). Under torchrun the returned stats cover every rank's tokens. fsdp: `student`
    is sharded with FSDP2, which reduces the gradients itself. cfg.prefix_reuse: each micro-batch
    encodes the prompt prefixes its turns share once (see turn_logprobs). grad_terms: first the
    norm of each advantage term's gradient and their cosine (term_gradient_norms)."""
    device = next(student.parameters()).device
    precision = compute_precision(cfg.precision, str(device))
    parameters = [p for p in student.parameters() if p.requires_grad]
    local_tokens = float(len(batch.old_logprobs))
    total_tokens = all_reduce_sum(torch.tensor(local_tokens, device=device), info)
    old = batch.old_logprobs.to(device)
    adv = batch.advantages.to(device)
    rollout = batch.rollout_logprobs.to(device) if batch.rollout_logprobs is not None else old
    weights = batch.loss_weights.to(device) if batch.loss_weights is not None else torch.ones_like(old)
    student.train()
    reuse = reuses_prefixes(student, cfg, fsdp)
    if reuse:   # sorted by tokens: a micro-batch holds turns of one task, which share the most
        order = sorted(range(len(batch.prompts)), key=lambda k: batch.prompts[k] + batch.responses[k])
    else:       # by length: little padding
        order = sorted(range(len(batch.prompts)), key=lambda k: len(batch.prompts[k]) + len(batch.responses[k]))
    # summed over micro-batches and epochs: loss, ratio, clipped tokens; over the first epoch:
    # |lp_new - lp_rollout| (the training forward under the rollout's weights: the mismatch)
    sums = torch.zeros(4, device=device)
    mismatch_max = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    micro_batches = math.ceil(len(order) / cfg.micro_batch)
    if fsdp:  # each forward/backward is a collective: every rank runs as many as the busiest one
        micro_batches = all_reduce_max(micro_batches, info, device)
    # each micro-batch's token positions, copied to the device once (not one blocking copy each)
    token_index = micro_batch_token_index(batch, order, cfg.micro_batch, device)
    terms = term_gradient_norms(student, batch, cfg, info, pad_id, fsdp) if grad_terms else {}
    first_norm = None
    for epoch in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        for m in range(0, micro_batches * cfg.micro_batch, cfg.micro_batch):
            turns = order[m:m + cfg.micro_batch]
            if not turns:   # fsdp only: a zero-loss micro-batch to match the other ranks
                zero_loss_backward(student, pad_id, precision)
                continue
            new_lp = turn_logprobs(student, [batch.prompts[k] for k in turns], [batch.responses[k] for k in turns],
                                   pad_id, reuse, fsdp, precision)
            index = token_index[m // cfg.micro_batch]
            new = torch.cat(new_lp)
            loss, _ = clipped_surrogate(new, old[index], adv[index], weights[index],
                                        eps_clip=cfg.eps_clip, num_tokens=total_tokens,
                                        with_stats=False)
            loss.backward()
            with torch.no_grad():
                ratio = torch.exp(new.detach() - old[index])
                clipped = (ratio < 1 - cfg.eps_clip) | (ratio > 1 + cfg.eps_clip)
                sums[:3] += torch.stack([loss.detach(), ratio.sum(), clipped.sum().to(ratio.dtype)])
                if epoch == 0:
                    gap = (new.detach() - rollout[index]).abs()
                    sums[3] += gap.sum()
                    mismatch_max = torch.maximum(mismatch_max, gap.max())
        if info.world > 1 and not fsdp:
            for p in parameters:
                # every rank must reduce the same tensors, also where its batch gave no gradient
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                all_reduce_sum(p.grad, info)
        # max_norm inf: report the norm without clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):   # fsdp: a DTensor
            grad_norm = grad_norm.full_tensor()
        first_norm = grad_norm if first_norm is None else first_norm
        optimizer.step()
    student.eval()
    sums = all_reduce_sum(sums, info).cpu()
    mismatch_max = all_reduce_max_tensor(mismatch_max, info).cpu()
    counted = max(1.0, float(total_tokens) * cfg.ppo_epochs)
    if terms:
        terms.update(term_cosine(terms, float(first_norm)))
    return {**terms, "loss": float(sums[0]) / cfg.ppo_epochs, "grad_norm": float(grad_norm),
            "mean_ratio": float(sums[1]) / counted, "clip_fraction": float(sums[2]) / counted,
            "tokens": int(total_tokens),
            "rollout_mismatch_mean": float(sums[3]) / max(1.0, float(total_tokens)),
            "rollout_mismatch_max": float(mismatch_max)}


def reuses_prefixes(student, cfg: TrainConfig, fsdp: bool) -> bool:
    """The update's shared-prefix path applies: asked for, not under FSDP (every rank must run the
    same number of forwards, and the tree's depth differs between ranks), and a model it runs
    exactly (full attention, a cache: not under gradient checkpointing)."""
    from atod_edge.scoring.prefix_tree import prefix_reuse_applies

    return cfg.prefix_reuse and not fsdp and prefix_reuse_applies(student)


def turn_logprobs(student, prompts, responses, pad_id: int, reuse: bool, fsdp: bool,
                  precision: str = "auto") -> list[torch.Tensor]:
    """One micro-batch's log-probs of its response tokens, with gradients: every turn on its own
    (right-padded rows), or one prefix tree whose shared prompt prefixes are encoded once."""
    from atod_edge.scoring.logprobs import response_logprobs
    from atod_edge.scoring.prefix_tree import shared_response_logprobs

    if reuse:
        return shared_response_logprobs(student, prompts, responses, pad_id=pad_id, micro_batch=len(prompts),
                                        precision=precision)
    return response_logprobs(student, prompts, responses, pad_id=pad_id, micro_batch=len(prompts), whole_model=fsdp,
                             precision=precision)


# --- the gradient of each advantage term (metrics every grad_norm_every steps) -------------------

def term_gradient_norms(student, batch: TokenBatch, cfg: TrainConfig, info: DistInfo, pad_id: int,
                        fsdp: bool = False) -> dict[str, float]:
    """grad_norm_opd and grad_norm_grpo: the norms of the update's gradient with kappa*A^OPD alone,
    then rho*A^GRPO alone as the advantages (batch.opd_term, batch.grpo_term), at the current
    weights: two extra forward/backward passes with the update's loss, micro-batches and
    reduction over ranks, before clipping; no optimizer step, and the gradients are zeroed after
    each. A term whose coefficient is 0 has norm 0 (no pass)."""
    parameters = [p for p in student.parameters() if p.requires_grad]
    norms = {}
    for key, term in (("grad_norm_opd", batch.opd_term), ("grad_norm_grpo", batch.grpo_term)):
        norm = 0.0
        if term is not None:
            backward_with(student, batch, term, cfg, info, pad_id, fsdp)
            norm = float(gradient_norm(parameters))
            for p in parameters:
                p.grad = None
        norms[key] = norm
    return norms


def term_cosine(terms: dict[str, float], combined_norm: float) -> dict[str, float]:
    """grad_cos_opd_grpo, the cosine between the two terms' gradients a and b, from their norms and
    the norm of the update's first-epoch gradient g: the surrogate is linear in the advantages
    while every ratio stays inside the clip range, as in the first epoch (ratio 1 up to the
    rollout's numerics), so g = a + b and |g|^2 = |a|^2 + |b|^2 + 2 a.b (no copy of a gradient
    kept). Empty when a term's gradient is 0 (the cosine is undefined)."""
    a, b = terms["grad_norm_opd"], terms["grad_norm_grpo"]
    if not (a > 0 and b > 0 and math.isfinite(combined_norm)):
        return {}
    cosine = (combined_norm ** 2 - a ** 2 - b ** 2) / (2 * a * b)
    return {"grad_cos_opd_grpo": max(-1.0, min(1.0, cosine))}


def backward_with(student, batch: TokenBatch, advantages: torch.Tensor, cfg: TrainConfig, info: DistInfo,
                  pad_id: int, fsdp: bool = False) -> None:
    """One pass of the update's loss over the batch with these per-token `advantages`, gradients
    accumulated into .grad and (ddp) summed over ranks; no optimizer step. The update's
    micro-batches, order, loss weights and token count; under fsdp every rank runs as many
    micro-batches as the busiest one."""
    device = next(student.parameters()).device
    precision = compute_precision(cfg.precision, str(device))
    total_tokens = all_reduce_sum(torch.tensor(float(len(batch.old_logprobs)), device=device), info)
    old = batch.old_logprobs.to(device)
    adv = advantages.to(device)
    weights = batch.loss_weights.to(device) if batch.loss_weights is not None else torch.ones_like(old)
    reuse = reuses_prefixes(student, cfg, fsdp)
    key = (lambda k: batch.prompts[k] + batch.responses[k]) if reuse else \
        (lambda k: len(batch.prompts[k]) + len(batch.responses[k]))
    order = sorted(range(len(batch.prompts)), key=key)   # the update's order
    micro_batches = math.ceil(len(order) / cfg.micro_batch)
    if fsdp:
        micro_batches = all_reduce_max(micro_batches, info, device)
    token_index = micro_batch_token_index(batch, order, cfg.micro_batch, device)
    was_training = student.training
    student.train()
    for m in range(0, micro_batches * cfg.micro_batch, cfg.micro_batch):
        turns = order[m:m + cfg.micro_batch]
        if not turns:   # fsdp only: a zero-loss micro-batch to match the other ranks
            zero_loss_backward(student, pad_id, precision)
            continue
        new = torch.cat(turn_logprobs(student, [batch.prompts[k] for k in turns],
                                      [batch.responses[k] for k in turns], pad_id, reuse, fsdp, precision))
        index = token_index[m // cfg.micro_batch]
        loss, _ = clipped_surrogate(new, old[index], adv[index], weights[index], eps_clip=cfg.eps_clip,
                                    num_tokens=total_tokens, with_stats=False)
        loss.backward()
    if info.world > 1 and not fsdp:
        for p in (p for p in student.parameters() if p.requires_grad):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_sum(p.grad, info)
    student.train(was_training)


def gradient_norm(parameters) -> torch.Tensor:
    """The L2 norm of the parameters' gradients (over every rank's shard under fsdp), unclipped."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# --- old log-probs and truncated turns (the numerics are in precision.py) ---------------------

@torch.no_grad()
def recompute_old_logprobs(student, episodes: list[Episode], cfg: TrainConfig, info: DistInfo, pad_id: int,
                           fsdp: bool = False, precision: str = "auto") -> torch.Tensor:
    """Replace the student_logprobs of every trained turn (the rollout engine's) with the update
    forward's log-probs under the current weights, before the first epoch (verl's old log-probs,
    see precision.py). Returns the rollout's log-probs, flat in build_batch's token order. Runs the
    update's forward (turn_logprobs) on the update's micro-batches; under fsdp every rank runs as
    many forwards as the busiest one (each is a collective)."""
    turns = [turn for ep in episodes for turn in ep.turns if trains_turn(turn, cfg)]
    rollout = torch.tensor([lp for turn in turns for lp in turn.student_logprobs], dtype=torch.float32)
    device = next(student.parameters()).device
    reuse = reuses_prefixes(student, cfg, fsdp)
    prompts = [turn.prompt_ids for turn in turns]
    responses = [turn.response_ids for turn in turns]
    if reuse:   # the update's order (see update)
        order = sorted(range(len(turns)), key=lambda k: prompts[k] + responses[k])
    else:
        order = sorted(range(len(turns)), key=lambda k: len(prompts[k]) + len(responses[k]))
    micro_batches = math.ceil(len(order) / cfg.micro_batch)
    if fsdp:
        micro_batches = all_reduce_max(micro_batches, info, device)
    recomputed: list[torch.Tensor | None] = [None] * len(turns)
    student.eval()
    for m in range(0, micro_batches * cfg.micro_batch, cfg.micro_batch):
        chunk = order[m:m + cfg.micro_batch]
        # fsdp: a rank out of turns runs a one-token forward to match the others
        logprobs = turn_logprobs(student, [prompts[k] for k in chunk] or [[pad_id]],
                                 [responses[k] for k in chunk] or [[pad_id]], pad_id, reuse, fsdp, precision)
        for k, lp in zip(chunk, logprobs):
            recomputed[k] = lp
    if turns:
        flat = torch.cat(recomputed).cpu().tolist()   # one copy to the host
        offset = 0
        for turn in turns:
            turn.student_logprobs = flat[offset:offset + len(turn.response_ids)]
            offset += len(turn.response_ids)
    return rollout


def correct_for_rollout(batch: TokenBatch, rollout_logprobs: torch.Tensor | None, cfg: TrainConfig) -> None:
    """With recomputed old log-probs: keep the rollout's on the batch (the update reports the
    mismatch against them) and, with tis_cap, weight each token's loss by the truncated
    importance ratio pi_old / pi_rollout."""
    if rollout_logprobs is None:
        return
    batch.rollout_logprobs = rollout_logprobs
    if cfg.tis_cap:
        batch.loss_weights, truncated = truncated_is_weights(batch.old_logprobs, rollout_logprobs, cfg.tis_cap)
        batch.stats["tis_truncated_fraction"] = truncated


def zero_loss_backward(student, pad_id: int, precision: str) -> None:
    """A backward pass that contributes nothing: under FSDP every rank must run the same number of
    forward/backward passes (their collectives pair up), so a rank with no turns left runs this."""
    from atod_edge.scoring.logprobs import response_logprobs

    new = torch.cat(response_logprobs(student, [[pad_id]], [[pad_id]], pad_id=pad_id, whole_model=True,
                                      precision=precision))
    (new.sum() * 0.0).backward()
