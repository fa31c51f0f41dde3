"""Log-probabilities of recorded response tokens under a model (teacher scoring, and the
student's forward in the update).

Every turn is one (prompt ids, response ids) pair. Pairs are right-padded into micro-batches and
run through one forward each; the log-prob of response token j comes from the logits at the
position before it. Teacher scoring runs under inference mode on the teacher's own device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from atod_edge.episode import Episode


def response_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      pad_id: int = 0, micro_batch: int = 16, entropy: bool = False, whole_model: bool = False,
                      ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per pair, a 1-D float32 tensor of log pi(response_j | prompt, response_<j).

    Runs with gradients when called under grad mode (the student's update), without under
    torch.inference_mode() (teacher scoring). With entropy=True also returns the full-vocabulary
    entropy at each response position (diagnostics only). whole_model=True always calls the
    model's own forward, never its decoder and head separately (a model sharded with FSDP
    gathers its top-level weights in hooks on that forward).
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
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        # positions whose logits predict a response token: len(p)-1 .. len(p)+len(r)-2 of each row
        rows = torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(chunk_r)])
        cols = torch.cat([torch.arange(len(p) - 1, len(p) + len(r) - 1) for p, r in zip(chunk_p, chunk_r)])
        rows, cols = rows.to(device), cols.to(device)
        with _autocast(device):
            logits = _response_logits(model, ids, mask, rows, cols, whole_model)
        logp = torch.log_softmax(logits.float(), dim=-1)
        targets = ids[rows, cols + 1]
        picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        sizes = [len(r) for r in chunk_r]
        out.extend(picked.split(sizes))
        if entropy:
            entropies.extend((-(logp.exp() * logp).sum(-1)).detach().split(sizes))
    return (out, entropies) if entropy else out


def _response_logits(model, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                     cols: torch.Tensor, whole_model: bool = False) -> torch.Tensor:
    """Logits at the selected positions only. The LM head over the whole vocabulary is a large
    share of a small model's compute; prompts are most of the tokens and need no logits."""
    if whole_model:
        # the model's own forward, with logits only at the positions any row needs
        keep = torch.unique(cols)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        return logits[rows, torch.searchsorted(keep, cols)]
    head = model.get_output_embeddings()
    decoder = getattr(model, "model", None)
    if head is None or decoder is None or getattr(model.config, "final_logit_softcapping", None):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, cols]
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return head(hidden[rows, cols])


def _autocast(device: torch.device):
    import contextlib

    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
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


def score_episodes(teacher, episodes: Sequence[Episode], pad_id: int = 0, micro_batch: int = 16) -> None:
    """Fill `teacher_logprobs` of every token-level turn: one no-grad forward per micro-batch."""
    prompts, responses, where = turn_pairs(episodes)
    if not prompts:
        return
    with torch.inference_mode():
        scores = response_logprobs(teacher, prompts, responses, pad_id=pad_id, micro_batch=micro_batch)
    for (e, t), lp in zip(where, scores):
        episodes[e].turns[t].teacher_logprobs = lp.cpu().tolist()
