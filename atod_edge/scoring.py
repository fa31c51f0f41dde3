"""Log-probabilities of recorded response tokens under a model (teacher scoring, and the
student's forward in the update).

Every turn is one (prompt ids, response ids) pair. Pairs are right-padded into micro-batches and
run through one forward each; the log-prob of response token j comes from the logits at the
position before it. Teacher scoring runs under inference mode on the teacher's own device.
Only response positions get logits, and `sampled_logprobs` turns them into the sampled tokens'
log-probs a chunk of positions at a time (no [tokens, vocab] log-softmax is kept for backward).
"""

from __future__ import annotations

from typing import Sequence

import torch

from atod_edge.episode import Episode


LOGPROB_CHUNK_TOKENS = 512   # response positions whose [chunk, vocab] logits exist at one time


def response_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      pad_id: int = 0, micro_batch: int = 16, entropy: bool = False, whole_model: bool = False,
                      precision: str = "auto", chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
                      ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per pair, a 1-D float32 tensor of log pi(response_j | prompt, response_<j).

    Runs with gradients when called under grad mode (the student's update), without under
    torch.inference_mode() (teacher scoring). With entropy=True also returns the full-vocabulary
    entropy at each response position (diagnostics only). whole_model=True always calls the
    model's own forward, never its decoder and head separately (a model sharded with FSDP
    gathers its top-level weights in hooks on that forward). precision: the autocast of the
    forward (`compute_autocast`: "auto" is bf16 on CUDA, none on CPU). The
    log-probs come from `sampled_logprobs`, `chunk_tokens` response positions at a time.
    """
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []
    for start in range(0, len(prompts), micro_batch):
        chunk_p = prompts[start:start + micro_batch]
        chunk_r = responses[start:start + micro_batch]
        lengths = [len(p) + len(r) for p, r in zip(chunk_p, chunk_r)]
        width = max(lengths)
        ids = torch.full((len(chunk_p), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk_p), width), dtype=torch.long)
        for i, (p, r) in enumerate(zip(chunk_p, chunk_r)):
            ids[i, :lengths[i]] = torch.tensor(list(p) + list(r), dtype=torch.long)
            mask[i, :lengths[i]] = 1
        # positions whose logits predict a response token: len(p)-1 .. len(p)+len(r)-2 of each row
        rows = torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(chunk_r)])
        cols = torch.cat([torch.arange(len(p) - 1, len(p) + len(r) - 1) for p, r in zip(chunk_p, chunk_r)])
        targets = ids[rows, cols + 1]
        keep = torch.unique(cols)   # on the host: a device-side unique would wait for the GPU
        # index tensors are built on the host; copying them from pinned memory does not block it
        ids, mask, rows, cols, targets, keep = (_to_device(t, device) for t in (ids, mask, rows, cols, targets, keep))
        with compute_autocast(device, precision):
            features, head = _response_features(model, ids, mask, rows, cols, keep, whole_model)
        picked = sampled_logprobs(features, targets, head=head, chunk_tokens=chunk_tokens, entropy=entropy)
        if entropy:
            picked, chunk_entropy = picked
        sizes = [len(r) for r in chunk_r]
        out.extend(picked.split(sizes))
        if entropy:
            entropies.extend(chunk_entropy.split(sizes))
    return (out, entropies) if entropy else out


def sampled_logprobs(features: torch.Tensor, targets: torch.Tensor, head=None,
                     chunk_tokens: int = LOGPROB_CHUNK_TOKENS, entropy: bool = False,
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits)[target] per position, float32, without a [positions, vocab] log-softmax.

    features: [N, hidden] hidden states with `head` (the LM head: logits = head(features)), or
    [N, vocab] logits with head=None; targets: [N] token ids. Works on `chunk_tokens` positions at
    a time: only one chunk's logits and their fp32 log-softmax exist at once, and under grad mode
    each chunk is recomputed in backward (activation checkpointing) instead of being kept, so
    peak memory holds one [chunk, vocab] block, not the [N, vocab] logits, their fp32 copy, the
    log-softmax and its gradient. The head runs in its weight's dtype with autocast off: fp32
    logits for an fp32 (master-weight) student even inside a bf16 autocast forward. The value is
    log_softmax(logits.float()).gather(target), row by row the same computation.
    entropy=True also returns the full-vocabulary entropy at each position (detached).
    """
    from torch.utils.checkpoint import checkpoint

    needs_grad = torch.is_grad_enabled() and (
        features.requires_grad or (head is not None and any(p.requires_grad for p in head.parameters())))
    picked, entropies = [], []
    for start in range(0, features.shape[0], chunk_tokens):
        chunk = (features[start:start + chunk_tokens], targets[start:start + chunk_tokens], head, entropy)
        lp, ent = checkpoint(_chunk_logprobs, *chunk, use_reentrant=False) if needs_grad else _chunk_logprobs(*chunk)
        picked.append(lp)
        entropies.append(ent)
    if not picked:   # no response positions
        picked = [features.new_zeros(0, dtype=torch.float32)]
        entropies = [picked[0]]
    lp = torch.cat(picked)
    return (lp, torch.cat(entropies)) if entropy else lp


def _chunk_logprobs(features, targets, head, entropy: bool):
    """(log-probs of `targets`, entropies or None) for one chunk of positions."""
    if head is not None:
        with torch.autocast(device_type=features.device.type, enabled=False):
            weight = getattr(head, "weight", None)
            logits = head(features.to(weight.dtype) if weight is not None else features)
    else:
        logits = features
    logp = torch.log_softmax(logits.float(), dim=-1)   # one chunk's: freed after the gather
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = -(logp.exp() * logp).sum(-1)
    return picked, ent


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _response_features(model, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       keep: torch.Tensor, whole_model: bool = False):
    """(hidden states at the selected positions, the LM head), or (their logits, None) where the
    model's own forward must make them. The LM head over the whole vocabulary is a large share of
    a small model's compute; prompts are most of the tokens and need no logits. keep: the sorted
    distinct `cols` (built on the host)."""
    if whole_model:
        # the model's own forward, with logits only at the positions any row needs
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        return logits[rows, torch.searchsorted(keep, cols)], None
    head = model.get_output_embeddings()
    decoder = getattr(model, "model", None)
    if head is None or decoder is None or getattr(model.config, "final_logit_softcapping", None):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, cols], None
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return hidden[rows, cols], head


PRECISIONS = ("auto", "fp32", "bf16")


def compute_autocast(device: torch.device | str, precision: str = "auto"):
    """The autocast scope of a forward: bf16 autocast for "bf16" (on any device, CPU included) and
    for "auto" on CUDA; none for "fp32" and for "auto" on CPU (bf16 matmuls are slow there).
    Weights keep their own dtype: an fp32 student computes in bf16 inside it (mixed precision)."""
    import contextlib

    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def turn_pairs(episodes: Sequence[Episode]) -> tuple[list[list[int]], list[list[int]], list[tuple[int, int]]]:
    """Flatten the token-level turns: (prompts, responses, (episode index, turn index) of each)."""
    prompts, responses, where = [], [], []
    for e, ep in enumerate(episodes):
        for t, turn in enumerate(ep.turns):
            if turn.prompt_ids is None or turn.response_ids is None:
                continue
            prompts.append(turn.prompt_ids)
            responses.append(turn.response_ids)
            where.append((e, t))
    return prompts, responses, where


def score_episodes(teacher, episodes: Sequence[Episode], pad_id: int = 0, micro_batch: int = 16,
                   precision: str = "auto", prefix_reuse: bool = True) -> None:
    """Fill `teacher_logprobs` of every token-level turn: one no-grad forward per micro-batch,
    one copy to the host at the end. prefix_reuse: each micro-batch's shared prompt prefixes are
    computed once (atod_edge.shared_prefix; same log-probs), where the teacher allows it."""
    from atod_edge.shared_prefix import prefix_reuse_applies, shared_response_logprobs

    prompts, responses, where = turn_pairs(episodes)
    if not prompts:
        return
    with torch.inference_mode():
        if prefix_reuse and prefix_reuse_applies(teacher):
            scores = shared_response_logprobs(teacher, prompts, responses, pad_id=pad_id, micro_batch=micro_batch,
                                              precision=precision)
        else:
            scores = response_logprobs(teacher, prompts, responses, pad_id=pad_id, micro_batch=micro_batch,
                                       precision=precision)
    flat = torch.cat(scores).cpu().tolist()
    offset = 0
    for (e, t), lp in zip(where, scores):
        episodes[e].turns[t].teacher_logprobs = flat[offset:offset + len(lp)]
        offset += len(lp)
