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

The cache holds keys and values in the forward's compute dtype: under a bf16 autocast an fp32
model's keys come out fp32 (Qwen3's q/k norms and the fp32 rotary tables upcast them), but SDPA
casts them to bf16 anyway, so a bf16 cache gives the same outputs at half the memory and no
per-step cast of the whole cache.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer


class KVShapeMismatch(ValueError):
    """A layer's keys do not have the shape its buffer was made for (a model whose config does not
    give its KV heads or head_dim the usual way); TorchPolicy then decodes it without the slab."""


class BufferLayer(DynamicLayer):
    """One layer's keys and values [B, kv_heads, T, head_dim], written into a buffer with room
    for `capacity` positions; `keys`/`values` are views of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor):
        super().lazy_initialization(key_states)
        self.dtype = cache_dtype(key_states)
        batch, heads, _, dim = key_states.shape
        self._k = key_states.new_empty((batch, heads, self.capacity, dim), dtype=self.dtype)
        self._v = key_states.new_empty((batch, heads, self.capacity, dim), dtype=self.dtype)

    def update(self, key_states, value_states, cache_kwargs=None):
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if key_states.shape[1] != self._k.shape[1] or key_states.shape[3] != self._k.shape[3]:
            raise KVShapeMismatch(f"keys of shape {tuple(key_states.shape)} do not fit a KV buffer of "
                                  f"{tuple(self._k.shape)} (kv_slab reads kv heads and head_dim from the model's config)")
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
        """Keep the rows `indices` (a device tensor; never read on the host). A selection no
        larger than the batch (finished sequences leaving the decode batch) is compacted in
        place: one gather of the kept rows' filled positions and one write of them over the
        first rows, per buffer, not the room after them. A larger one (repeated rows) gets new
        buffers."""
        if not self.is_initialized:
            return
        rows = indices.shape[0]
        if rows <= self._k.shape[0]:
            for buffer in (self._k, self._v):
                filled = buffer[:, :, :self.length]
                filled[:rows] = filled.index_select(0, indices)   # gathered first: no overlap
            self._k, self._v = self._k[:rows], self._v[:rows]
        else:
            self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]


def cache_dtype(key_states: torch.Tensor) -> torch.dtype:
    """The dtype a cache keeps keys and values in: the autocast dtype where autocast is on for
    their device and they are in a wider float type (what SDPA would cast them to), else their own."""
    return narrowest_dtype(key_states.dtype, key_states.device)


def narrowest_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """cache_dtype for keys of `dtype` on `device` (a kv_slab's dtype: a model's parameter dtype)."""
    kind = torch.device(device).type
    if dtype.is_floating_point and torch.is_autocast_enabled(kind):
        narrow = torch.get_autocast_dtype(kind)
        if torch.finfo(narrow).bits < torch.finfo(dtype).bits:
            return narrow
    return dtype


def buffer_cache(num_layers: int, capacity: int, prefix: tuple[torch.Tensor, int] | None = None) -> Cache:
    """A cache of BufferLayers with room for `capacity` positions. `prefix`: (kv [layers, 2, B,
    kv_heads, capacity, head_dim], filled width) to write into, its first `width` positions
    already filled (a kv_slab region, see gather_prefixes; width 0: nothing yet)."""
    cache = Cache(layers=[BufferLayer(capacity) for _ in range(num_layers)])
    if prefix is not None:
        kv, width = prefix
        for index, layer in enumerate(cache.layers):
            layer.adopt(kv[index, 0], kv[index, 1], width)
    return cache


CPU_STORE_BYTES = 256 << 20      # the store's size on CPU unless given
FREE_MEMORY_SHARE = 0.25         # on an accelerator: this share of the memory free when the store opens


class PrefixStore:
    """KV blocks of prompt prefixes. A block is one tensor [layers, 2 (k, v), kv_heads, block, head_dim].

    Its size: `max_tokens` prompt tokens (whatever a token's KV weighs), or `max_bytes`, or,
    with neither, `store_budget_bytes` of the device the first block lies on (a share of the
    free memory on CUDA, CPU_STORE_BYTES on CPU). A MB budget fixed for every model held only
    ~73 blocks of Qwen3-0.6B in 256 MiB."""

    def __init__(self, block: int = 16, max_bytes: int | None = None, max_tokens: int | None = None):
        if block < 1:
            raise ValueError("block must be >= 1")
        self.block = block
        self.max_bytes = max_bytes
        self.max_tokens = max_tokens
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
        if self.max_bytes is None:   # the first block: its size is known now
            self.max_bytes = (self.max_tokens // self.block * size if self.max_tokens is not None
                              else store_budget_bytes(kv))
        if size > self.max_bytes:
            return
        self.blocks[key] = kv
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.blocks.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def pinned(self, block_keys: list[list[bytes]], hits: list[int]) -> dict[bytes, torch.Tensor]:
        """The matched blocks (each prompt's first hits[i]), held for one prefill: the blocks a
        batch stores may evict blocks that a later batch of the same prefill matched."""
        return {key: self.blocks[key] for keys, n in zip(block_keys, hits) for key in keys[:n]}

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def store_budget_bytes(sample: torch.Tensor | None) -> int:
    """A prefix store's size where none was given: FREE_MEMORY_SHARE of the free memory of the
    CUDA device `sample` lies on (read once, when the store gets its first block), else
    CPU_STORE_BYTES."""
    if sample is not None and sample.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(sample.device)
        return int(free * FREE_MEMORY_SHARE)
    return CPU_STORE_BYTES


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


def gather_prefixes(store: PrefixStore, block_keys: list[list[bytes]], hits: list[int], out: torch.Tensor,
                    blocks: dict[bytes, torch.Tensor] | None = None) -> int:
    """Write the batch's reused prefixes into `out` (kv [layers, 2, B, kv_heads, capacity, head_dim],
    a kv_slab region): row i's hits[i] blocks right-aligned in the first `width` positions (width:
    the longest reused prefix), zeros before them (masked out by the caller, and finite, as masked
    values must be). `blocks`: the matched blocks pinned when the hits were counted
    (PrefixStore.pinned; default: the store's own). Returns the width (0: nothing reused, nothing
    written)."""
    blocks = store.blocks if blocks is None else blocks
    width = max(hits) * store.block
    for i, (keys, n) in enumerate(zip(block_keys, hits)):
        start = width - n * store.block
        out[:, :, i, :, :start] = 0
        for b, key in enumerate(keys[:n]):           # each block straight into its place
            at = start + b * store.block
            out[:, :, i, :, at:at + store.block] = blocks[key]
    return width


def kv_slab(config, rows: int, capacity: int, dtype: torch.dtype, device) -> torch.Tensor:
    """One uninitialised buffer for a whole decode batch's keys and values: [layers, 2, rows,
    kv_heads, capacity, head_dim] of `config`'s decoder. The torch policy prefills each length
    bucket of a batch straight into its rows (right-aligned, room for the new tokens after) and
    decodes from it, so no bucket's cache is copied into a merged one."""
    from atod_edge.models.loading import decoder_dims

    dims = decoder_dims(config)
    return torch.empty((dims["layers"], 2, rows, dims["kv_heads"], capacity, dims["head_dim"]), dtype=dtype, device=device)


def store_new_blocks(store: PrefixStore, cache, block_keys: list[list[bytes]], hits: list[int],
                     suffix_lengths: list[int]) -> None:
    """Put the freshly computed full blocks of each prompt into the store. `cache` holds, per
    layer, [B, kv_heads, T, head_dim] after the prefill, each prompt's suffix (its tokens after
    the hits[i] reused blocks) right-aligned; new blocks all lie in the suffixes."""
    wanted = [(i, b) for i, (keys, n) in enumerate(zip(block_keys, hits)) for b in range(n, len(keys))]
    if not wanted:
        return
    total = cache.layers[0].keys.shape[2]
    # the first cache index of each new block: suffixes are right-aligned to the cache's end
    starts = [total - suffix_lengths[i] + (b - hits[i]) * store.block for i, b in wanted]
    device = cache.layers[0].keys.device
    rows = torch.tensor([i for i, _ in wanted], device=device)[:, None]                  # [N, 1]
    columns = (torch.tensor(starts)[:, None] + torch.arange(store.block)[None, :]).to(device)   # [N, block]
    first = cache.layers[0].keys
    blocks = first.new_empty((len(wanted), len(cache.layers), 2, first.shape[1], store.block, first.shape[3]))
    for index, layer in enumerate(cache.layers):        # one gather per buffer: only the new blocks
        for kv, buffer in enumerate((layer.keys, layer.values)):
            blocks[:, index, kv] = buffer[rows, :, columns].transpose(1, 2)   # [N, block, heads, dim] -> [N, heads, ...]
    for (i, b), kv in zip(wanted, blocks):
        store.add(block_keys[i][b], kv)
