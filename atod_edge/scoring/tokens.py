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



@contextlib.contextmanager
def head_matmuls(device, low_precision: bool):
    """The LM head's fp32 matmuls at the speed the device allows, fp32 in and out: as TF32 on CUDA
    (tf32_matmuls, whatever the compute precision); on CPU, with low_precision (the forward runs
    under bf16 autocast), as oneDNN's bf16 mode: inputs rounded to bf16, fp32 accumulation and
    fp32 logits, the CPU's counterpart of TF32 (2.1x the fp32 head on this project's AMX CPU for
    [512 x 576] x [576 x 49,152], benchmarks/bench_cpu_kernels.py; a log-prob moves by ~1e-2 at most, see tests/train/test_precision.py).
    Restored after; nothing else changes."""
    device = torch.device(device)
    if device.type == "cuda":
        with tf32_matmuls(device):
            yield
        return
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    if device.type != "cpu" or not low_precision or mkldnn is None or not torch.backends.mkldnn.is_available():
        yield
        return
    before = mkldnn.fp32_precision
    mkldnn.fp32_precision = "bf16"
    try:
        yield
    finally:
        mkldnn.fp32_precision = before


def sampled_logprobs(features: torch.Tensor, targets: torch.Tensor, head=None,
                     chunk_tokens: int = LOGPROB_CHUNK_TOKENS, entropy: bool = False,
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits)[target] per position, float32, without a [positions, vocab] log-softmax.

    features: [N, hidden] hidden states with `head` (the LM head: logits = head(features)), or
    [N, vocab] logits with head=None; targets: [N] token ids. Works on `chunk_tokens` positions at
    a time: only one chunk's logits exist at once. An fp32 linear head's chunk runs through
    HeadLogprob (the gradient of the log-prob is written from the logits recomputed in backward:
    no log-softmax kept, recomputed or differentiated); any other head, logits given, or a call
    asking for entropies (diagnostics: one log-softmax gives both) takes the log-softmax, under
    grad mode with activation checkpointing of the chunk. Peak memory holds one [chunk, vocab] block.

    The head runs in its weight's dtype with autocast off: fp32 logits for an fp32 (master-weight)
    student even inside a bf16 autocast forward, its matmuls through head_matmuls (TF32 on CUDA;
    on CPU under bf16 autocast, bf16 inputs with fp32 accumulation). The value is
    log_softmax(logits.float()).gather(target), row by row, up to rounding.
    entropy=True also returns the full-vocabulary entropy at each position (detached).
    """
    from torch.utils.checkpoint import checkpoint

    low = torch.is_autocast_enabled(features.device.type) and \
        torch.get_autocast_dtype(features.device.type) == torch.bfloat16
    linear = isinstance(head, torch.nn.Linear) and head.weight.dtype == torch.float32 and not entropy
    needs_grad = torch.is_grad_enabled() and (
        features.requires_grad or (head is not None and any(p.requires_grad for p in head.parameters())))
    picked, entropies = [], []
    for start in range(0, features.shape[0], chunk_tokens):
        x, t = features[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if linear:
            with torch.autocast(device_type=x.device.type, enabled=False):
                lp, ent = HeadLogprob.apply(x.float(), head.weight, head.bias, t, low), None
        elif needs_grad:
            lp, ent = checkpoint(_chunk_logprobs, x, t, head, entropy, low, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(x, t, head, entropy, low)
        picked.append(lp)
        entropies.append(ent)
    if not picked:   # no response positions
        picked = [features.new_zeros(0, dtype=torch.float32)]
        entropies = [picked[0]]
    lp = torch.cat(picked)
    return (lp, torch.cat(entropies)) if entropy else lp


def _chunk_logprobs(features, targets, head, entropy: bool, low: bool = False):
    """(log-probs of `targets`, entropies or None) for one chunk of positions."""
    if head is not None:
        with torch.autocast(device_type=features.device.type, enabled=False), head_matmuls(features.device, low):
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


def log_sum_exp_(logits: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(logits, -1), bit for bit (the same steps: the row maximum, 0 where it is
    infinite, subtract, exp, sum, log, add it back), computed in place: `logits` is left holding
    exp(logits - max). torch.logsumexp writes that [rows, vocab] difference to a new tensor,
    which at a 49k vocabulary took as long as all the rest (a 512-row chunk: 39 -> 18 ms at two
    threads, benchmarks/bench_cpu_kernels.py)."""
    top = logits.amax(-1, keepdim=True)
    top = top.masked_fill(top.abs() == float("inf"), 0)
    return logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))


class HeadLogprob(torch.autograd.Function):
    """log softmax(x W^T + b)[target] per row, with a hand-written backward: it keeps x and the
    log-sum-exp per row, recomputes the chunk's logits, and turns them in place into the gradient
    of the logits, g * (onehot(target) - softmax), then dX = G W and dW = G^T x. The same math as
    autograd through log_softmax + gather, without keeping, recomputing or differentiating a
    [chunk, vocab] log-softmax (under activation checkpointing that was half the head's time).

    On CPU under bf16 (low), a forward that needs gradients keeps the chunk's softmax in bf16
    instead (2 bytes a logit until backward; CPU memory is plentiful): backward then skips the
    recomputed matmul and the exp over the vocabulary, a quarter of the head's time."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, low):
        with head_matmuls(x.device, low):
            logits = torch.nn.functional.linear(x, weight, bias)
        keep = low and x.device.type == "cpu" and any(ctx.needs_input_grad[:3])
        target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if keep:   # one exp over the vocabulary gives the log-sum-exp and the softmax
            top = logits.amax(-1, keepdim=True)
            e = logits.sub_(top).exp_()
            total = e.sum(-1, keepdim=True)
            lse = (top + total.log()).squeeze(-1)
            probs = e.div_(total).to(torch.bfloat16)
        else:
            lse, probs = log_sum_exp_(logits), None
        picked = target_logits - lse
        ctx.save_for_backward(x, weight, bias, targets, lse, probs)
        ctx.low = low
        return picked

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, targets, lse, probs = ctx.saved_tensors
        with head_matmuls(x.device, ctx.low):
            if probs is not None:
                grad_logits = probs.float().mul_(-grad.unsqueeze(-1))
            else:
                logits = torch.nn.functional.linear(x, weight, bias)
                grad_logits = logits.sub_(lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
            grad_logits.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1))
            dx = grad_logits @ weight if ctx.needs_input_grad[0] else None
            dw = grad_logits.T @ x if ctx.needs_input_grad[1] else None
        db = grad_logits.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None
