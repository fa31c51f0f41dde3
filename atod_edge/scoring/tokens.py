"""The log-probability of each sampled token from hidden states or logits, a chunk of positions
at a time (no [tokens, vocab] log-softmax is kept for backward). The kernel under every scorer:
teacher scoring, the prefix tree and the student's forward in the update."""

from __future__ import annotations

import contextlib

import torch


LOGPROB_CHUNK_TOKENS = 512   # response positions whose [chunk, vocab] logits exist at one time


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (built on the host) on `device`: on CUDA copied from pinned memory without
    blocking the host (the caching host allocator keeps the pinned buffer until the copy is
    done); elsewhere a plain copy."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@contextlib.contextmanager
def tf32_matmuls(device):
    """fp32 matmuls on CUDA as TF32 (fp32 range and accumulation, inputs rounded to 10 bits of
    mantissa) inside the scope, restored after; nothing elsewhere. The fp32 LM head of a
    master-weight student ([tokens, hidden] x [hidden, 151,936] for Qwen3) runs at full fp32
    speed only this way; measured on CPU by rounding the inputs, TF32 moves a log-prob by at
    most a few 1e-3 (see tests/test_gpu_path.py)."""
    if torch.device(device).type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):       # torch >= 2.9: the legacy flag must not be mixed in
        before = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision = before
    else:
        before = matmul.allow_tf32
        matmul.allow_tf32 = True
        try:
            yield
        finally:
            matmul.allow_tf32 = before



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
    logits for an fp32 (master-weight) student even inside a bf16 autocast forward (as TF32 on
    CUDA: `tf32_matmuls`). The value is log_softmax(logits.float()).gather(target), row by row
    the same computation.
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
        with torch.autocast(device_type=features.device.type, enabled=False), tf32_matmuls(features.device):
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
