"""Sampling a response: the parameters, the sampler (one uniform draw per row), when a sequence
stops (end-of-turn tokens and stop strings), and left padding of a batch of prompts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atod_edge.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 48
    temperature: float = 1.0        # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ("</action>",)



def stop_token_ids(tokenizer) -> set[int]:
    """End-of-turn tokens: eos plus the chat end marker if the vocabulary has one."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
        if marker in vocab:
            ids.add(int(vocab[marker]))
    return ids



class StopChecker:
    """Decides when one sequence is done: an end-of-turn token or a stop string in its tail."""

    def __init__(self, tokenizer, sampling: SamplingParams):
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.stop_strings = tuple(s for s in sampling.stop if s)
        self.max_new_tokens = sampling.max_new_tokens
        self._tail = 1 + max((len(s) for s in self.stop_strings), default=0)
        self._may_end = _tokens_that_may_end(tokenizer, self.stop_strings) if self.stop_strings else None

    def is_done(self, token_ids: list[int]) -> str | None:
        if token_ids and token_ids[-1] in self.stop_ids:
            return "stop"
        # a stop string not in the tail before this token can only appear now if this token holds its
        # last character: the other tokens' tails need no decode (one per sequence per decode step)
        if self.stop_strings and (self._may_end is None or not token_ids or token_ids[-1] in self._may_end):
            tail = self.tokenizer.decode(token_ids[-self._tail:], skip_special_tokens=True)
            if any(s in tail for s in self.stop_strings):
                return "stop"
        if len(token_ids) >= self.max_new_tokens:
            return "length"
        return None

    def text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)



_MAY_END: dict[tuple[int, tuple[str, ...]], tuple[object, frozenset[int] | None]] = {}



def _tokens_that_may_end(tokenizer, stop_strings: tuple[str, ...]) -> frozenset[int] | None:
    """Ids of the tokens whose text may hold the last character of a stop string: those whose
    vocabulary entry holds it (byte-level BPE and SentencePiece vocabularies spell printable
    ASCII as itself), plus every byte-fallback (<0x..>) and added token. None (decode every
    step) where a stop string ends in other than printable ASCII. Cached per tokenizer."""
    key = (id(tokenizer), stop_strings)
    cached = _MAY_END.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    ends = {s[-1] for s in stop_strings}
    if not all(c.isascii() and c.isprintable() and not c.isspace() for c in ends):
        ids = None
    else:
        added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        ids = frozenset(i for token, i in tokenizer.get_vocab().items()
                        if i in added or token.startswith("<0x") or any(c in token for c in ends))
    _MAY_END[key] = (tokenizer, ids)
    return ids



def left_pad(prompts, pad_id: int):
    """Left-pad a batch of prompts: (input ids, attention mask, position ids) as int64 numpy
    arrays. Explicit positions let each sequence see the positions it would see alone."""
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise UserError("empty prompt given to the policy")
    width = max(lengths)
    input_ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(prompts), width), dtype=np.int64)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = p
        attention[i, width - len(p):] = 1
    positions = np.clip(attention.cumsum(-1) - 1, 0, None)
    return input_ids, attention, positions



def sample_next(logits, temperature: float, top_p: float, generator):
    """Sample token ids from [B, V] float32 logits; return (ids, log-probs at temperature 1).

    Sampling inverts each row's cumulative distribution at one uniform draw: B random numbers a
    step, where torch.multinomial draws B x V exponentials (~5 ms a decode step at B=64 and the
    tiny vocabulary, 12% of the rollout engine's time)."""
    import torch

    logprobs = torch.log_softmax(logits, dim=-1)
    if temperature <= 0:
        ids = logits.argmax(dim=-1)
    else:
        probs = logprobs.exp() if temperature == 1.0 else torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            cumulative = sorted_probs.cumsum(dim=-1)
            drop = cumulative - sorted_probs > top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        ids = _inverse_cdf(probs, generator)
    return ids, logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)



def _inverse_cdf(probs, generator):
    """One draw per row of [B, V] non-negative weights (not necessarily normalized): the first
    token whose cumulative weight exceeds u * total, u uniform in [0, 1). The point is kept below
    the row's total, so the token found always has positive weight."""
    import torch

    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    point = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).squeeze(-1)
