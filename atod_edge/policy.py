"""The policy interface every backend implements, and the PyTorch (transformers) backend.

A policy turns a batch of prompts (token ids) into sampled responses with the log-probability of
every sampled token under the policy (temperature 1, i.e. the model's own distribution, which is
what ATOD's lp_S needs). Backends: torch (here), onnxruntime and llama.cpp (atod_edge.backends,
which import this module; `atod_edge.backends.load_policy` picks one by file kind). All of them
share this interface, so evaluation, training, the TUI and export verification run
the same rollout code whatever the file format.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from atod_edge.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 48
    temperature: float = 1.0        # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ("</action>",)


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]           # log pi(token | context) of each sampled token (temperature 1)
    text: str
    finish_reason: str              # "stop" (stop string or end-of-turn token) or "length"


class Policy(ABC):
    """A token-level policy. `tokenizer` is a Hugging Face tokenizer used for prompts and decoding."""

    name: str = "policy"
    tokenizer = None

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                 seed: int | None = None) -> list[Generation]:
        """Sample one response per prompt. Deterministic for a given seed on a given backend."""

    def reusing_prefixes(self):
        """A scope in which the policy may reuse the work done on prompt prefixes across generate
        calls (the rollout engine opens one per batch of episodes). The weights must not change
        inside it. Default: nothing is reused."""
        return contextlib.nullcontext()

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


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


def length_batches(lengths: Sequence[int], call_cost: int = 128) -> list[list[int]]:
    """Split sequences of these token counts into batches (each right- or left-padded to its
    longest) that minimize the padded tokens computed, sum of (rows x longest), plus `call_cost`
    tokens' worth per forward call. Exact dynamic programming over the lengths sorted longest
    first (batches are runs of that order). Returns the batches as lists of indices into
    `lengths`, ascending. Used by the engine's prefill and by atod_edge.shared_prefix."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n     # best[j]: cost of the first j prompts of `order`
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):                  # the last batch is order[i:j], its longest is order[i]
            cost = best[i] + (j - i) * lengths[order[i]] + call_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches, j = [], n
    while j > 0:
        batches.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return batches[::-1]


class TorchPolicy(Policy):
    """transformers causal LM with a batched KV-cache decode loop (CPU fp32, CUDA bf16 autocast;
    `precision` as in atod_edge.scoring.compute_autocast: "bf16" autocasts on CPU too).

    Prompts are left-padded with explicit position ids, so each sequence sees exactly the
    positions it would see alone; finished sequences leave the batch (the cache is compacted).
    Inside a `reusing_prefixes()` scope, the KV of prompt prefixes seen earlier in the scope is
    reused (atod_edge.kv_cache): only each prompt's new tokens are prefilled.
    """

    def __init__(self, model, tokenizer, name: str = "torch", device: str | None = None,
                 prefix_cache_mb: int = 256, precision: str = "auto"):
        import torch

        from atod_edge.kv_cache import supports_prefix_cache

        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device) if device else next(model.parameters()).device
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        self.prefix_cache_mb = prefix_cache_mb
        self.precision = precision              # the forward's autocast (scoring.compute_autocast)
        self._full_attention = supports_prefix_cache(model.config)   # buffer cache and prefix reuse apply
        self._store = None                      # a PrefixStore inside a reusing_prefixes() scope
        self.last_store = None                  # the last scope's store, for its hit statistics

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: str | None = None) -> "TorchPolicy":
        from atod_edge.models import load_model

        device = str(torch_device(device))
        model, tokenizer = load_model(path, device=device, dtype=dtype)
        model.eval()
        return cls(model, tokenizer, name=str(path), device=device)

    @contextlib.contextmanager
    def reusing_prefixes(self):
        from atod_edge.kv_cache import PrefixStore

        if self._store is not None or not self.prefix_cache_mb or not self._full_attention:
            yield                               # nested scope (reuse the outer one) or not applicable
            return
        self._store = self.last_store = PrefixStore(max_bytes=self.prefix_cache_mb << 20)
        try:
            yield
        finally:
            self._store = None

    def generate(self, prompts, sampling: SamplingParams, seed: int | None = None) -> list[Generation]:
        import torch

        if not prompts:
            return []
        device = self.device
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else int(seed))
        checker = StopChecker(self.tokenizer, sampling)

        outputs: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        with torch.inference_mode(), _autocast(device, self.precision):
            # live: the prompt index of each row still in the batch
            logits, cache, attention, positions, live = self._prefill(prompts, sampling.max_new_tokens)
            while True:
                ids, lps = sample_next(logits, sampling.temperature, sampling.top_p, generator)
                ids_list, lps_list = ids.tolist(), lps.tolist()   # one host sync per decode step
                keep = []
                for row, orig in enumerate(live):
                    outputs[orig].append(ids_list[row])
                    logprobs[orig].append(lps_list[row])
                    finish[orig] = checker.is_done(outputs[orig])
                    if finish[orig] is None:
                        keep.append(row)
                if not keep:
                    break
                if len(keep) < len(live):
                    live = [live[r] for r in keep]
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    attention, ids, positions = attention[index], ids[index], positions[index]
                attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
                positions = positions + 1
                out = self.model(input_ids=ids.unsqueeze(-1), attention_mask=self._mask(attention, 1),
                                 position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache, logits = out.past_key_values, out.logits[:, -1, :].float()

        return [Generation(outputs[i], logprobs[i], checker.text(outputs[i]), finish[i] or "length")
                for i in range(len(prompts))]

    def _prefill(self, prompts, max_new_tokens: int):
        """The forward over the prompts. Identical prompts (a group's first turn) are computed
        once; inside a reusing_prefixes scope, only the tokens after each prompt's longest stored
        prefix are. Prompts whose new parts differ much in length are prefilled in separate
        batches (length_batches), so short ones are not padded to the longest, and their caches
        are then merged, right-aligned. Returns the last position's float32 logits [B, V], the
        cache, the attention mask [B, T], the last position ids [B, 1] and the prompt index of
        every row."""
        import torch

        from atod_edge.kv_cache import merge_right_aligned

        distinct: dict[tuple[int, ...], int] = {}
        inverse = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        unique = [list(p) for p in distinct]
        store = self._store
        if store:
            block_keys = [store.keys(p) for p in unique]
            self._store_common_prefix(unique, block_keys)
            hits = [store.match(keys) for keys in block_keys]
            reused = [n * store.block for n in hits]
            store.hit_tokens += sum(reused[i] for i in inverse)
            store.prompt_tokens += sum(len(p) for p in prompts)
        else:
            block_keys, hits, reused = [[]] * len(unique), [0] * len(unique), [0] * len(unique)
        new_tokens = [len(p) - r for p, r in zip(unique, reused)]
        buckets = length_batches(new_tokens) if self._full_attention else [list(range(len(unique)))]
        parts = [self._forward_rows([unique[i] for i in b], [reused[i] for i in b], [block_keys[i] for i in b],
                                    [hits[i] for i in b], max_new_tokens if len(buckets) == 1 else 0)
                 for b in buckets]
        if len(parts) == 1:
            logits, cache, attention, positions = parts[0]
        else:
            cache, width = merge_right_aligned([part[1] for part in parts], max_new_tokens)
            attention = torch.cat([torch.nn.functional.pad(part[2], (width - part[2].shape[1], 0))
                                   for part in parts])
            logits, positions = (torch.cat([part[k] for part in parts]) for k in (0, 3))
        row_of = {u: r for r, u in enumerate(i for b in buckets for i in b)}   # unique prompt -> row
        order = sorted(range(len(prompts)), key=lambda j: row_of[inverse[j]])
        index = [row_of[inverse[j]] for j in order]
        if len(unique) < len(prompts):          # repeated prompts: copy their rows
            index = torch.tensor(index, device=self.device)
            cache.batch_select_indices(index)
            logits, attention, positions = logits[index], attention[index], positions[index]
        return logits, cache, attention, positions, order

    def _forward_rows(self, rows, reused, block_keys, hits, room: int):
        """Prefill one batch of distinct prompts whose first reused[i] tokens come from the
        prefix store; the cache has `room` positions to spare. Returns (logits, cache,
        attention, last positions), as _prefill."""
        import torch

        from atod_edge.kv_cache import gather_prefixes, store_new_blocks

        store = self._store
        suffixes = [p[r:] for p, r in zip(rows, reused)]
        capacity = max(reused) + max(len(x) for x in suffixes) + room
        cache = self._new_cache(capacity, gather_prefixes(store, block_keys, hits, capacity) if store else None)
        input_ids, attention, positions = left_pad(suffixes, self.pad_id)
        positions = positions + np.asarray(reused, dtype=np.int64)[:, None]
        width = max(reused)
        prefix_mask = np.arange(width)[None, :] >= (width - np.asarray(reused))[:, None]
        attention = np.concatenate([prefix_mask.astype(np.int64), attention], axis=1)
        input_ids, attention, positions = (torch.from_numpy(a).to(self.device)
                                           for a in (input_ids, attention, positions))
        out = self.model(input_ids=input_ids, attention_mask=self._mask(attention, input_ids.shape[1]),
                         position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1, :].float()
        if store:
            store_new_blocks(store, cache, block_keys, hits, [len(x) for x in suffixes])
        return logits, cache, attention, positions[:, -1:]

    def _store_common_prefix(self, prompts, block_keys) -> None:
        """When the prompts share leading blocks that the store lacks (the first turn: the
        system instruction), compute those once, with a batch of one, and store them."""
        import torch

        from atod_edge.kv_cache import store_new_blocks

        store = self._store
        if len(prompts) < 2:
            return
        common = 0
        for key in block_keys[0]:
            if any(len(keys) <= common or keys[common] != key for keys in block_keys[1:]):
                break
            common += 1
        if common == 0 or store.match(block_keys[0][:common]) == common:
            return
        ids = torch.tensor([prompts[0][:common * store.block]], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, past_key_values=self._new_cache(ids.shape[1]),
                         logits_to_keep=1)
        store_new_blocks(store, out.past_key_values, [block_keys[0][:common]], [0], [ids.shape[1]])

    def _new_cache(self, capacity: int, prefix=None):
        """A KV cache with room for `capacity` positions, starting from a gathered prefix
        (transformers' DynamicCache where the model has sliding-window layers, which the buffer
        cache does not model, and where prefixes are never reused)."""
        from transformers import DynamicCache

        from atod_edge.kv_cache import buffer_cache

        if self._full_attention:
            return buffer_cache(self.model.config.get_text_config(decoder=True).num_hidden_layers, capacity, prefix)
        return DynamicCache()

    def _mask(self, attention, query_length: int):
        if getattr(self.model.config, "_attn_implementation", None) == "sdpa":
            mask = _mask_4d(attention, query_length)
            if self.device.type == "cpu":
                # the same mask as additive floats: SDPA's CPU kernel gives bit-identical outputs
                # ~25% faster than with the boolean one (decode attention is most of the engine)
                mask = mask.new_zeros(mask.shape, dtype=self.model.dtype).masked_fill_(~mask, float("-inf"))
            return mask
        return attention


def _mask_4d(attention, query_length: int):
    """The boolean [B, 1, Q, KV] attention mask for SDPA, built directly (transformers' generic
    mask builder took 13% of the engine's time in a profile of 64 episodes): a query attends to the non-padding
    keys at or before its own cache index. A padding query attends to itself only, which keeps
    its (unused) output finite."""
    import torch

    keep = attention.bool()[:, None, None, :]
    if query_length == 1:
        return keep
    width = attention.shape[1]
    k_index = torch.arange(width, device=attention.device)[None, :]
    q_index = torch.arange(width - query_length, width, device=attention.device)[:, None]
    return (keep & (k_index <= q_index)) | (k_index == q_index)


def torch_device(name: str):
    """A torch.device for a user-given name, or a one-line UserError (a typo, or CUDA asked for
    where torch has none) instead of torch's traceback."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device '{name}' (examples: cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}': CUDA is not available here "
                            f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _autocast(device, precision: str = "auto"):
    from atod_edge.scoring import compute_autocast

    return compute_autocast(device, precision)
