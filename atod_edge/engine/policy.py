"""The policy interface every backend implements, and the PyTorch (transformers) backend.

A policy turns a batch of prompts (token ids) into sampled responses with the log-probability of
every sampled token under the policy (temperature 1, i.e. the model's own distribution, which is
what ATOD's lp_S needs). Backends: torch (here), onnxruntime and llama.cpp (atod_edge.engine.backends,
which import this module; `atod_edge.engine.backends.load_policy` picks one by file kind). All of them
share this interface, so evaluation, training, the TUI and export verification run
the same rollout code whatever the file format.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from atod_edge.engine.batching import length_batches
from atod_edge.engine.context import check_fits, model_context
from atod_edge.engine.precision import compute_autocast, torch_device
from atod_edge.engine.sampling import SamplingParams, StopChecker, left_pad, sample_next


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
    #: prompt + new tokens the model takes (None: unknown); generate() refuses a batch that does not
    #: fit (engine.context.check_fits), the rollout cuts prompts to fit first (rollout.budget)
    context_length: int | None = None

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


class TorchPolicy(Policy):
    """transformers causal LM with a batched KV-cache decode loop (CPU fp32, CUDA bf16 autocast;
    `precision` as in atod_edge.engine.precision.compute_autocast: "bf16" autocasts on CPU too).

    Prompts are left-padded with explicit position ids, so each sequence sees exactly the
    positions it would see alone; finished sequences leave the batch (the cache is compacted).
    Inside a `reusing_prefixes()` scope, the KV of prompt prefixes seen earlier in the scope is
    reused (atod_edge.engine.kv_cache): only each prompt's new tokens are prefilled.
    """

    fold_gqa = True     # decode with atod_edge.engine.attention's folded SDPA (False: transformers' own)

    def __init__(self, model, tokenizer, name: str = "torch", device: str | None = None,
                 prefix_cache_mb: int | None = None, precision: str = "auto", prefix_cache_tokens: int | None = None):
        import torch

        from atod_edge.engine.kv_cache import supports_prefix_cache

        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device) if device else next(model.parameters()).device
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        self.prefix_cache_mb = prefix_cache_mb  # the prefix store's size (0: off; None: kv_cache.PrefixStore's default)
        self.prefix_cache_tokens = prefix_cache_tokens   # or its size in prompt tokens
        self.precision = precision              # the forward's autocast (scoring.compute_autocast)
        self._full_attention = supports_prefix_cache(model.config)   # buffer cache and prefix reuse apply
        self.context_length = model_context(model.config)
        self._store = None                      # a PrefixStore inside a reusing_prefixes() scope
        self.last_store = None                  # the last scope's store, for its hit statistics

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: str | None = None, precision: str = "auto") -> "TorchPolicy":
        """precision "bf16"/"fp32": the weights are loaded in that dtype (unless `dtype` says
        otherwise) and decode under its autocast; "auto": load_model's dtype, compute_autocast's."""
        from atod_edge.models.loading import load_model

        device = str(torch_device(device))
        model, tokenizer = load_model(path, device=device, dtype=dtype or (None if precision == "auto" else precision))
        model.eval()
        return cls(model, tokenizer, name=str(path), device=device, precision=precision)

    @contextlib.contextmanager
    def reusing_prefixes(self):
        from atod_edge.engine.kv_cache import PrefixStore

        if self._store is not None or self.prefix_cache_mb == 0 or not self._full_attention:
            yield                               # nested scope (reuse the outer one) or not applicable
            return
        self._store = self.last_store = PrefixStore(
            max_bytes=None if self.prefix_cache_mb is None else self.prefix_cache_mb << 20,
            max_tokens=self.prefix_cache_tokens)
        try:
            yield
        finally:
            self._store = None

    def generate(self, prompts, sampling: SamplingParams, seed: int | None = None) -> list[Generation]:
        import torch

        if not prompts:
            return []
        check_fits(prompts, sampling.max_new_tokens, self.context_length, "model")
        device = self.device
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else int(seed))
        checker = StopChecker(self.tokenizer, sampling)

        outputs: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        with torch.inference_mode(), compute_autocast(device, self.precision), self._attention():
            # live: the prompt index of each row still in the batch
            logits, cache, attention, positions, live = self._prefill_or_fall_back(prompts, sampling.max_new_tokens)
            padded = bool((attention == 0).any())   # no padded row: decode without a mask (SDPA's GQA, no repeat_kv)
            lean = getattr(self.model, "atod_lean_decode", None) if self._full_attention else None
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
                    padded = padded and bool((attention == 0).any())
                attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
                positions = positions + 1
                mask = self._mask(attention, 1) if padded else None
                if lean is not None:    # a rollout copy's own decode step (rollout_copy.LeanDecode): the same logits
                    logits = lean(ids.unsqueeze(-1), positions, cache, mask).float()
                else:
                    out = self.model(input_ids=ids.unsqueeze(-1), attention_mask=mask,
                                     position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    cache, logits = out.past_key_values, out.logits[:, -1, :].float()

        return [Generation(outputs[i], logprobs[i], checker.text(outputs[i]), finish[i] or "length")
                for i in range(len(prompts))]

    def _prefill_or_fall_back(self, prompts, max_new_tokens: int):
        """_prefill; a model whose keys do not fit the KV slab its config describes (its first
        forward raises KVShapeMismatch, before anything is stored) is from then on decoded as a
        sliding-window model is: transformers' DynamicCache, no prefix reuse."""
        from atod_edge.engine.kv_cache import KVShapeMismatch

        try:
            return self._prefill(prompts, max_new_tokens)
        except KVShapeMismatch:
            if not self._full_attention:
                raise
            self._full_attention, self._store = False, None
            return self._prefill(prompts, max_new_tokens)

    def _prefill(self, prompts, max_new_tokens: int):
        """The forward over the prompts. Identical prompts (a group's first turn) are computed
        once; inside a reusing_prefixes scope, only the tokens after each prompt's longest stored
        prefix are. Prompts whose new parts differ much in length are prefilled in separate
        batches (length_batches), so short ones are not padded to the longest, each straight into
        its rows of one KV slab (kv_cache.kv_slab), right-aligned to the widest: the decode runs
        on the slab, no cache is copied. Returns the last position's float32 logits [B, V], the
        cache, the attention mask [B, T], the last position ids [B, 1] and the prompt index of
        every row."""
        import torch

        from atod_edge.engine.kv_cache import buffer_cache, kv_slab, narrowest_dtype

        distinct: dict[tuple[int, ...], int] = {}
        inverse = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        unique = [list(p) for p in distinct]
        store = self._store
        if store:
            block_keys = [store.keys(p) for p in unique]
            self._store_common_prefix(unique, block_keys)
            hits = [store.match(keys) for keys in block_keys]
            pinned = store.pinned(block_keys, hits)   # a later bucket's hits survive an earlier one's stores
            reused = [n * store.block for n in hits]
            store.hit_tokens += sum(reused[i] for i in inverse)
            store.prompt_tokens += sum(len(p) for p in prompts)
        else:
            block_keys, hits, reused, pinned = [[]] * len(unique), [0] * len(unique), [0] * len(unique), {}
        new_tokens = [len(p) - r for p, r in zip(unique, reused)]
        if not self._full_attention:        # a DynamicCache: one batch, no reuse
            logits, cache, attention, positions = self._forward_rows(unique, reused, block_keys, hits, None, pinned)
            buckets = [list(range(len(unique)))]
        else:
            # the buckets' caches are regions of one slab: bucket b's rows, right-aligned to the
            # widest bucket, with max_new_tokens of room after; the decode runs on the whole slab
            buckets = length_batches(new_tokens)
            widths = [max(reused[i] for i in b) + max(new_tokens[i] for i in b) for b in buckets]
            width = max(widths)
            slab = kv_slab(self.model.config, len(unique), width + max_new_tokens,
                           narrowest_dtype(self.model.dtype, self.device), self.device)
            parts, row = [], 0
            for b, w in zip(buckets, widths):
                region = slab[:, :, row:row + len(b), :, width - w:]
                slab[:, :, row:row + len(b), :, :width - w] = 0      # before a narrower bucket: masked, finite
                parts.append(self._forward_rows([unique[i] for i in b], [reused[i] for i in b],
                                                [block_keys[i] for i in b], [hits[i] for i in b], region, pinned))
                row += len(b)
            cache = buffer_cache(slab.shape[0], slab.shape[4], (slab, width))
            attention = torch.cat([torch.nn.functional.pad(part[2], (width - part[2].shape[1], 0)) for part in parts])
            logits, positions = (torch.cat([part[k] for part in parts]) for k in (0, 3))
        row_of = {u: r for r, u in enumerate(i for b in buckets for i in b)}   # unique prompt -> row
        order = sorted(range(len(prompts)), key=lambda j: row_of[inverse[j]])
        index = [row_of[inverse[j]] for j in order]
        if len(unique) < len(prompts):          # repeated prompts: copy their rows
            index = torch.tensor(index, device=self.device)
            cache.batch_select_indices(index)
            logits, attention, positions = logits[index], attention[index], positions[index]
        return logits, cache, attention, positions, order

    def _forward_rows(self, rows, reused, block_keys, hits, region, pinned: dict):
        """Prefill one batch of distinct prompts whose first reused[i] tokens come from the
        prefix store, into `region` (a kv_slab region [layers, 2, rows, kv_heads, capacity,
        head_dim]; None: a DynamicCache). Returns the last position's float32 logits [B, V], the
        batch's cache (its filled width: the longest reused prefix + the longest suffix, each
        row right-aligned), the attention mask [B, width] and the last position ids [B, 1]."""
        import torch

        from atod_edge.engine.kv_cache import buffer_cache, gather_prefixes, store_new_blocks

        store = self._store
        suffixes = [p[r:] for p, r in zip(rows, reused)]
        if region is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        else:
            filled = gather_prefixes(store, block_keys, hits, region, pinned) if store else 0
            cache = buffer_cache(region.shape[0], region.shape[4], (region, filled))
        input_ids, attention, positions = left_pad(suffixes, self.pad_id)
        positions = positions + np.asarray(reused, dtype=np.int64)[:, None]
        width = max(reused)
        prefix_mask = np.arange(width)[None, :] >= (width - np.asarray(reused))[:, None]
        attention = np.concatenate([prefix_mask.astype(np.int64), attention], axis=1)
        input_ids, attention, positions = (torch.from_numpy(a).to(self.device)
                                           for a in (input_ids, attention, positions))
        # the last position as an index tensor, not logits_to_keep=1: the slice hidden[:, -1:] is a strided
        # view, under which torch.matmul expands the LM head's weight to [B, hidden, vocab] and copies it
        # (~1 s a prefill batch at SmolLM2's 49k vocabulary in bf16); an index gathers a contiguous row
        last = torch.tensor([input_ids.shape[1] - 1], device=self.device)
        out = self.model(input_ids=input_ids, attention_mask=self._mask(attention, input_ids.shape[1]),
                         position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=last)
        cache, logits = out.past_key_values, out.logits[:, -1, :].float()
        if store:
            store_new_blocks(store, cache, block_keys, hits, [len(x) for x in suffixes])
        return logits, cache, attention, positions[:, -1:]

    def _store_common_prefix(self, prompts, block_keys) -> None:
        """When the prompts share leading blocks that the store lacks (the first turn: the
        system instruction), compute those once, with a batch of one, and store them."""
        import torch

        from atod_edge.engine.kv_cache import buffer_cache, store_new_blocks

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
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1,
                         past_key_values=buffer_cache(self.model.config.get_text_config(decoder=True).num_hidden_layers,
                                                      ids.shape[1]))
        store_new_blocks(store, out.past_key_values, [block_keys[0][:common]], [0], [ids.shape[1]])

    def _attention(self):
        """The scope of the engine's forwards: SDPA with each KV group's query heads folded into
        the query axis (atod_edge.engine.attention: no repeat_kv copy of the cache under a mask)
        unless `fold_gqa` is off."""
        from atod_edge.engine.attention import folded_attention

        return folded_attention(self.model) if self.fold_gqa else contextlib.nullcontext()

    def _mask(self, attention, query_length: int):
        from atod_edge.engine.attention import is_sdpa

        if is_sdpa(self.model.config):
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


