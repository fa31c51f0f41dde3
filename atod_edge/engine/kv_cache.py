"""The torch policy's KV-cache machinery: a decode cache that grows in place, and automatic
prefix caching (reuse of the attention keys/values of prompt prefixes across generate calls).

transformers' DynamicCache appends each decode step's keys with torch.cat, copying the whole
cache every step; `BufferCache` writes into preallocated room instead (it doubles when full).

Every prompt of an episode starts with the same system instruction and task, and the G
rollouts of a group share all of their first prompt; recomputing those tokens at every turn is
most of the rollout engine's prefill. The store keeps the KV of each full block of `block`
prompt tokens, keyed by *all* the tokens up to the block's end (the scheme of vLLM's automatic
prefix caching), so a hit on block b means the prompt's first (b + 1) * block tokens are the
same as those of an earlier prompt, positions included. Least recently used blocks are evicted
beyond a size budget.

Prefix keys were computed with the weights of the moment: a store is only valid while the
weights do not change, which is why TorchPolicy opens one per `reusing_prefixes()` scope (one
batch of episodes) and drops it at the end.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer


class BufferLayer(DynamicLayer):
    """One layer's keys and values [B, kv_heads, T, head_dim], written into a buffer with room
    for `capacity` positions; `keys`/`values` are views of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor):
        super().lazy_initialization(key_states)
        batch, heads, _, dim = key_states.shape
        self._k = key_states.new_empty((batch, heads, self.capacity, dim))
        self._v = key_states.new_empty((batch, heads, self.capacity, dim))

    def update(self, key_states, value_states, cache_kwargs=None):
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self._k.shape[2]:                  # out of room: double it
            room = max(end, 2 * self._k.shape[2]) - self._k.shape[2]
            self._k = torch.cat([self._k, self._k.new_empty((*self._k.shape[:2], room, self._k.shape[3]))], 2)
            self._v = torch.cat([self._v, self._v.new_empty((*self._v.shape[:2], room, self._v.shape[3]))], 2)
        self._k[:, :, start:end] = key_states
        self._v[:, :, start:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take buffers [B, kv_heads, capacity, head_dim] whose first `length` positions are filled."""
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._k, self._v, self.length = keys, values, length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices`. Ascending indices (finished sequences leaving the decode
        batch) are compacted in place: each kept row moves up over the rows that left, and only
        the filled positions are copied, not the room after them."""
        if not self.is_initialized:
            return
        keep = indices.tolist()
        if all(a < b for a, b in zip(keep, keep[1:])):
            for buffer in (self._k, self._v):
                for row, source in enumerate(keep):   # source >= row: not yet overwritten
                    if source != row:
                        buffer[row, :, :self.length].copy_(buffer[source, :, :self.length])
            self._k, self._v = self._k[:len(keep)], self._v[:len(keep)]
        else:                                         # any other selection (repeats, reordering)
            self._k, self._v = self._k[indices], self._v[indices]
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]


def buffer_cache(num_layers: int, capacity: int, prefix: tuple[torch.Tensor, int] | None = None) -> Cache:
    """A cache of BufferLayers with room for `capacity` positions. `prefix`, from gather_prefixes:
    (kv [layers, 2, B, kv_heads, capacity, head_dim], filled width) to start from."""
    cache = Cache(layers=[BufferLayer(capacity) for _ in range(num_layers)])
    if prefix is not None:
        kv, width = prefix
        for index, layer in enumerate(cache.layers):
            layer.adopt(kv[index, 0], kv[index, 1], width)
    return cache


class PrefixStore:
    """KV blocks of prompt prefixes. A block is one tensor [layers, 2 (k, v), kv_heads, block, head_dim]."""

    def __init__(self, block: int = 16, max_bytes: int = 256 << 20):
        if block < 1:
            raise ValueError("block must be >= 1")
        self.block = block
        self.max_bytes = max_bytes
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hit_tokens = 0       # prompt tokens whose KV came from the store
        self.prompt_tokens = 0    # prompt tokens seen

    def keys(self, prompt: Sequence[int]) -> list[bytes]:
        """Keys of the prompt's full blocks, leaving at least one token to compute (its logits
        start the response)."""
        ids = np.asarray(prompt, dtype=np.int64)
        return [ids[:end].tobytes() for end in range(self.block, len(ids), self.block)]

    def match(self, keys: list[bytes]) -> int:
        """How many leading blocks are stored (marks them recently used)."""
        n = 0
        for key in keys:
            if key not in self.blocks:
                break
            self.blocks.move_to_end(key)
            n += 1
        return n

    def add(self, key: bytes, kv: torch.Tensor) -> None:
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return
        kv = kv.clone()           # own memory: a view would pin the whole batch's cache
        size = kv.numel() * kv.element_size()
        if size > self.max_bytes:
            return
        self.blocks[key] = kv
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.blocks.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def supports_prefix_cache(config) -> bool:
    """Only models whose every layer attends to the full context (a sliding-window layer's cache
    is not a plain prefix)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    if getattr(config, "sliding_window", None) is None:
        return True
    return getattr(config, "use_sliding_window", True) is False


def gather_prefixes(store: PrefixStore, block_keys: list[list[bytes]], hits: list[int],
                    capacity: int) -> tuple[torch.Tensor, int] | None:
    """The batch's reused prefixes, laid out for buffer_cache: kv [layers, 2, B, kv_heads, capacity,
    head_dim] where row i holds its hits[i] blocks right-aligned in the first `width` positions
    (width: the longest reused prefix), zeros before them (masked out by the caller, and finite,
    as masked values must be), and room after. Returns (kv, width), or None when nothing is reused."""
    width = max(hits) * store.block
    if width == 0:
        return None
    sample = store.blocks[next(keys[0] for keys, n in zip(block_keys, hits) if n)]
    layers, _, heads, _, dim = sample.shape
    kv = sample.new_empty((layers, 2, len(hits), heads, max(capacity, width), dim))
    for i, (keys, n) in enumerate(zip(block_keys, hits)):
        start = width - n * store.block
        kv[:, :, i, :, :start] = 0
        for b, key in enumerate(keys[:n]):           # each block straight into its place
            at = start + b * store.block
            kv[:, :, i, :, at:at + store.block] = store.blocks[key]
    return kv, width


def store_new_blocks(store: PrefixStore, cache, block_keys: list[list[bytes]], hits: list[int],
                     suffix_lengths: list[int]) -> None:
    """Put the freshly computed full blocks of each prompt into the store. `cache` holds, per
    layer, [B, kv_heads, T, head_dim] after the prefill, each prompt's suffix (its tokens after
    the hits[i] reused blocks) right-aligned; new blocks all lie in the suffixes."""
    if all(len(keys) == n for keys, n in zip(block_keys, hits)):
        return
    width = max(suffix_lengths)
    kv = torch.stack([torch.stack((layer.keys[:, :, -width:], layer.values[:, :, -width:]))
                      for layer in cache.layers])          # [layers, 2, B, kv_heads, width, head_dim]
    for i, (keys, n, s) in enumerate(zip(block_keys, hits, suffix_lengths)):
        for b in range(n, len(keys)):
            offset = width - s + (b - n) * store.block
            store.add(keys[b], kv[:, :, i, :, offset:offset + store.block])


def merge_right_aligned(caches: Sequence[Cache], room: int) -> tuple[Cache, int]:
    """One buffer cache holding the rows of several (batches prefilled separately), each
    right-aligned to the widest: keys of row i at [width - its width, width), zeros before
    them (masked out by the caller's attention mask, and finite), `room` positions after.
    Returns (cache, width)."""
    width = max(c.get_seq_length() for c in caches)
    merged = buffer_cache(len(caches[0].layers), width + room)
    for index, layer in enumerate(merged.layers):
        parts = [c.layers[index] for c in caches]
        batch = sum(p.keys.shape[0] for p in parts)
        _, heads, _, dim = parts[0].keys.shape
        k = parts[0].keys.new_empty((batch, heads, width + room, dim))
        v = torch.empty_like(k)
        row = 0
        for part in parts:
            n, start = part.keys.shape[0], width - part.keys.shape[2]
            for buffer, values in ((k, part.keys), (v, part.values)):
                buffer[row:row + n, :, :start] = 0
                buffer[row:row + n, :, start:width] = values
            row += n
        layer.adopt(k, v, width)
    return merged, width

