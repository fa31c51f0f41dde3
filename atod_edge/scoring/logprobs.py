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

from atod_edge.engine.precision import compute_autocast
from atod_edge.rollout.episode import Episode
from atod_edge.scoring.prefix_tree import prefix_reuse_applies, shared_response_logprobs
from atod_edge.scoring.tokens import LOGPROB_CHUNK_TOKENS, sampled_logprobs, to_device

SCORE_TOKEN_BUDGET = 16384   # suggested tokens a no-grad scoring forward (config score_token_budget)


def response_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      pad_id: int = 0, micro_batch: int = 16, entropy: bool = False, whole_model: bool = False,
                      precision: str = "auto", chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
                      token_budget: int | None = None,
                      ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per pair, a 1-D float32 tensor of log pi(response_j | prompt, response_<j).

    Runs with gradients when called under grad mode (the student's update), without under
    torch.inference_mode() (teacher scoring). With entropy=True also returns the full-vocabulary
    entropy at each response position (diagnostics only). whole_model=True always calls the
    model's own forward, never its decoder and head separately (a model sharded with FSDP
    gathers its top-level weights in hooks on that forward). precision: the autocast of the
    forward (`compute_autocast`: "auto" is bf16 on CUDA, none on CPU). The
    log-probs come from `sampled_logprobs`, `chunk_tokens` response positions at a time.
    token_budget: forwards of pairs of similar length, each at most `token_budget` padded tokens
    (`token_batches`), instead of `micro_batch` pairs in the order given (no-grad work, whose
    memory is the activations of one forward, not those kept for backward).
    """
    device = next(model.parameters()).device
    groups = (token_batches([len(p) + len(r) for p, r in zip(prompts, responses)], token_budget) if token_budget
              else [list(range(s, min(s + micro_batch, len(prompts)))) for s in range(0, len(prompts), micro_batch)])
    out: list[torch.Tensor | None] = [None] * len(prompts)
    entropies: list[torch.Tensor | None] = [None] * len(prompts)
    for group in groups:
        chunk_p = [prompts[i] for i in group]
        chunk_r = [responses[i] for i in group]
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
        ids, mask, rows, cols, targets, keep = (to_device(t, device) for t in (ids, mask, rows, cols, targets, keep))
        with compute_autocast(device, precision):   # the head's matmuls follow it (scoring/tokens.py)
            features, head = _response_features(model, ids, mask, rows, cols, keep, whole_model)
            picked = sampled_logprobs(features, targets, head=head, chunk_tokens=chunk_tokens, entropy=entropy)
        if entropy:
            picked, chunk_entropy = picked
        sizes = [len(r) for r in chunk_r]
        for i, lp in zip(group, picked.split(sizes)):
            out[i] = lp
        if entropy:
            for i, ent in zip(group, chunk_entropy.split(sizes)):
                entropies[i] = ent
    return (out, entropies) if entropy else out   # type: ignore[return-value]


def token_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices of `lengths` in groups of similar length (ascending), each group's rows times its
    longest length at most `token_budget` (a longer sequence alone)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


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
                   precision: str = "auto", prefix_reuse: bool = True, token_budget: int | None = None) -> None:
    """Fill `teacher_logprobs` of every token-level turn: one no-grad forward per micro-batch,
    one copy to the host at the end. prefix_reuse: each micro-batch's shared prompt prefixes are
    computed once (atod_edge.scoring.prefix_tree; same log-probs), where the teacher allows it.
    token_budget (e.g. SCORE_TOKEN_BUDGET): forwards cut by tokens instead of `micro_batch` turns
    (the update's micro-batch, sized for backward, leaves a no-grad forward mostly idle)."""
    prompts, responses, where = turn_pairs(episodes)
    if not prompts:
        return
    with torch.inference_mode():
        if prefix_reuse and prefix_reuse_applies(teacher):
            scores = shared_response_logprobs(teacher, prompts, responses, pad_id=pad_id, micro_batch=micro_batch,
                                              precision=precision, token_budget=token_budget)
        else:
            scores = response_logprobs(teacher, prompts, responses, pad_id=pad_id, micro_batch=micro_batch,
                                       precision=precision, token_budget=token_budget)
    flat = torch.cat(scores).cpu().tolist()
    offset = 0
    for (e, t), lp in zip(where, scores):
        episodes[e].turns[t].teacher_logprobs = flat[offset:offset + len(lp)]
        offset += len(lp)
