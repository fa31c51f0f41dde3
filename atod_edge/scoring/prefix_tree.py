"""Log-probs of many token sequences that share prefixes, each shared prefix computed once.

Every turn's prompt of an episode starts with the same system text and task, and the G rollouts
of a group share their task: scoring each (prompt, response) pair on its own re-encodes that
common part for every turn (57% of the prompt tokens of the default job). Here the sequences of a
micro-batch are put in a prefix tree (a compressed trie over their token ids): a node holds a run
of tokens that every sequence below it shares. The model runs over the tree level by level, in
batches of nodes of similar length (little padding), each node's tokens attending to the
keys/values of its ancestors (gathered from its parent's batch) and to its own earlier tokens. Under grad mode the gathers are differentiable, so one backward sends
every turn's gradient through the shared part. The result equals the per-sequence forward up to
floating-point rounding (a different batching of the same sums): each token sees exactly the
tokens before it in its own sequence, at the same positions.

Log-probs come from `atod_edge.scoring.tokens.sampled_logprobs`, the one place hidden states become
per-token log-probs (chunked over positions). A tree node shorter than `min_shared` tokens is not
worth its own forward and is copied into its children instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

MIN_SHARED_TOKENS = 8
BATCH_COST = 64   # a forward of a batch of tree nodes costs about as much as 64 more padded tokens


@dataclass
class Node:
    """Positions [start, end) of the sequence `owner` (every sequence below the node has the same
    tokens there); `parent` indexes the node list (-1: none), depth = the parent's depth + 1."""

    owner: int
    start: int
    end: int
    parent: int
    depth: int


def prefix_tree(sequences: Sequence[Sequence[int]], min_shared: int = MIN_SHARED_TOKENS,
                ) -> tuple[list[Node], list[int]]:
    """(nodes, last node of each sequence). The positions of sequence i are covered by the chain
    of nodes from its last node up to the root, without gaps or overlaps. Empty sequences get -1."""
    arrays = [np.asarray(s, dtype=np.int64) for s in sequences]
    order = sorted((i for i in range(len(arrays)) if len(arrays[i])), key=lambda i: list(sequences[i]))
    nodes: list[Node] = []
    last = [-1] * len(arrays)

    def common(a: np.ndarray, b: np.ndarray, pos: int) -> int:
        n = min(len(a), len(b))
        differ = np.flatnonzero(a[pos:n] != b[pos:n])
        return pos + (int(differ[0]) if len(differ) else n - pos)

    def build(lo: int, hi: int, node_start: int, pos: int, parent: int, depth: int) -> None:
        # order[lo:hi] (sorted) share their tokens before `pos`; [node_start, pos) is in no node yet
        if hi - lo == 1:
            i = order[lo]
            nodes.append(Node(i, node_start, len(arrays[i]), parent, depth))
            last[i] = len(nodes) - 1
            return
        # sorted: the common prefix of the range is that of its first and last sequences
        end = common(arrays[order[lo]], arrays[order[hi - 1]], pos)
        ending = lo
        while ending < hi and len(arrays[order[ending]]) == end:   # prefixes of the others sort first
            ending += 1
        if ending > lo or end - node_start >= min_shared:
            nodes.append(Node(order[lo], node_start, end, parent, depth))
            for k in range(lo, ending):
                last[order[k]] = len(nodes) - 1
            parent, depth, node_start = len(nodes) - 1, depth + 1, end
        k = ending
        while k < hi:   # runs of sequences with the same next token: one subtree each
            token, j = arrays[order[k]][end], k
            while j < hi and arrays[order[j]][end] == token:
                j += 1
            build(k, j, node_start, end + 1, parent, depth)
            k = j

    if order:
        build(0, len(order), 0, 0, -1, 0)
    return nodes, last


def shared_prefix_logprobs(model, sequences: Sequence[Sequence[int]], score_from: Sequence[int],
                           pad_id: int = 0, min_shared: int = MIN_SHARED_TOKENS, precision: str = "auto",
                           ) -> list[torch.Tensor]:
    """Per sequence, a 1-D float32 tensor of log pi(seq[j] | seq[:j]) for j = score_from[i] ..
    len(seq) - 1 (score_from >= 1), every shared prefix of the batch computed once.

    With gradients under grad mode, without under inference mode, like
    scoring.response_logprobs. The model must be a transformers causal LM that takes a cache
    (past_key_values); the caller keeps to models whose layers all attend to the full context.
    """
    from atod_edge.engine.attention import folded_attention
    from atod_edge.engine.precision import compute_autocast
    from atod_edge.scoring.tokens import sampled_logprobs, to_device

    device = next(model.parameters()).device
    empty = torch.zeros(0, dtype=torch.float32, device=device)
    # the last token is only ever a target: the model reads seq[:-1]
    inputs = [list(s[:-1]) if len(s) - f > 0 else [] for s, f in zip(sequences, score_from)]
    if any(f < 1 for f, s in zip(score_from, sequences) if len(s) > f):
        raise ValueError("score_from must be >= 1 (the first token has no logits before it)")
    nodes, last = prefix_tree(inputs, min_shared)
    if not nodes:
        return [empty for _ in sequences]

    # the chain of nodes of each sequence, root first
    chains = []
    for node in last:
        chain = []
        while node >= 0:
            chain.append(node)
            node = nodes[node].parent
        chains.append(chain[::-1])
    batches, batch_of, row_of = _batches(nodes)

    # scored positions: (row, column, target) per batch, deduplicated, and each sequence's picks
    entries: list[dict[tuple[int, int, int], int]] = [{} for _ in batches]
    picks_of: list[list[tuple[int, int]]] = []   # per sequence: (batch, entry index) in position order
    for i, chain in enumerate(chains):
        seq, picks = sequences[i], []
        first = score_from[i] - 1
        for index in chain:
            node, b = nodes[index], batch_of[index]
            table, row = entries[b], row_of[index]
            for position in range(max(first, node.start), node.end):
                key = (row, position - node.start, int(seq[position + 1]))
                picks.append((b, table.setdefault(key, len(table))))
        picks_of.append(picks)

    batch_logprobs = []
    # keys/values (per layer) and mask of every position a batch's rows saw, kept for its children
    full: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = {}
    last_child = {parent: b for b, (_, parent) in enumerate(batches) if parent >= 0}
    # grouped-query attention without repeat_kv copies; a trainable model's in fp32 on CPU
    # (engine/attention.py: the CPU's bf16 attention backward is slow), with or without gradients
    trainable = any(p.requires_grad for p in model.parameters())
    with compute_autocast(device, precision), folded_attention(model, fp32_on_cpu=trainable):
        for b, (members, parent_batch) in enumerate(batches):
            width = max(nodes[m].end - nodes[m].start for m in members)
            ids = torch.full((len(members), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(members), width), dtype=torch.long)
            positions = torch.zeros((len(members), width), dtype=torch.long)
            for row, m in enumerate(members):
                node = nodes[m]
                n = node.end - node.start
                ids[row, :n] = torch.as_tensor(np.asarray(inputs[node.owner][node.start:node.end]))
                mask[row, :n] = 1
                positions[row] = torch.arange(node.start, node.start + width)
            # built on the host: on CUDA copied from pinned memory without blocking it
            ids, mask, positions = to_device(ids, device), to_device(mask, device), to_device(positions, device)
            cache = _new_cache()
            if parent_batch >= 0:
                parents = to_device(torch.tensor([row_of[nodes[m].parent] for m in members]), device)
                keys, values, past_mask = full[parent_batch]
                if trainable:   # the recompute and the update: transformers' own cache, the same computation
                    for layer, (k, v) in enumerate(zip(keys, values)):
                        cache.update(k.index_select(0, parents), v.index_select(0, parents), layer)
                else:
                    cache = _gathered_cache(keys, values, parents, width)
                past = past_mask.index_select(0, parents)
                if last_child[parent_batch] == b:
                    del full[parent_batch]
            else:
                past = mask[:, :0]
            attention = _attention_mask(model, past, mask)
            mask = torch.cat([past, mask], dim=1)
            table = entries[b]
            rows, cols, targets = to_device(torch.tensor(list(table), dtype=torch.long).reshape(-1, 3).T,
                                            device)   # one copy for the three
            features, head, cache = _features(model, ids, attention, positions, cache, rows, cols)
            batch_logprobs.append(sampled_logprobs(features, targets, head=head) if len(table) else empty)
            if b in last_child:
                full[b] = ([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], mask)
    offsets = np.cumsum([0] + [len(lp) for lp in batch_logprobs])
    flat = torch.cat(batch_logprobs)
    index = to_device(torch.tensor([int(offsets[b]) + e for picks in picks_of for b, e in picks], dtype=torch.long),
                      device)   # every sequence's picks in one gather
    return list(flat.index_select(0, index).split([len(picks) for picks in picks_of]))


def _batches(nodes: list[Node], call_cost: int = BATCH_COST) -> tuple[list[tuple[list[int], int]], list[int], list[int]]:
    """The order the model runs the tree's nodes in: batches of nodes (node indices, and the
    batch that holds all their parents, -1 for roots), every batch after its parents' batch.
    Siblings and cousins share a batch (right-padded to its longest node, rows longest first),
    split where the padding would cost more than another forward (policy.length_batches, with
    `call_cost` tokens a forward: measured on the default job's teacher scoring, 64 beat 32,
    128 and the old rule of at most 20% padding by 5-7%). Also returns each node's batch and row."""
    from atod_edge.engine.batching import length_batches

    children: list[list[int]] = [[] for _ in nodes]
    roots = []
    for index, node in enumerate(nodes):
        (children[node.parent] if node.parent >= 0 else roots).append(index)
    batches: list[tuple[list[int], int]] = []
    batch_of, row_of = [0] * len(nodes), [0] * len(nodes)

    def add(members: list[int], parent_batch: int) -> None:
        lengths = [nodes[m].end - nodes[m].start for m in members]
        for split in length_batches(lengths, call_cost):
            group = sorted((members[i] for i in split), key=lambda m: nodes[m].start - nodes[m].end)
            for row, g in enumerate(group):
                batch_of[g], row_of[g] = len(batches), row
            batches.append((group, parent_batch))

    add(roots, -1)
    done = 0
    while done < len(batches):
        kids = [c for m in batches[done][0] for c in children[m]]
        if kids:
            add(kids, done)
        done += 1
    return batches, batch_of, row_of


def shared_response_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                             pad_id: int = 0, micro_batch: int = 16, min_shared: int = MIN_SHARED_TOKENS,
                             precision: str = "auto", token_budget: int | None = None) -> list[torch.Tensor]:
    """scoring.response_logprobs with prefix reuse: per pair, log pi(response_j | prompt, response_<j).
    Pairs are sorted by their tokens (neighbours share the most) and cut into micro-batches of
    `micro_batch` pairs, or, with token_budget, of at most `token_budget` tree tokens (the
    tokens not shared with the pair before: what the tree computes), each one prefix tree; the
    results come back in the order given."""
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    out: list[torch.Tensor | None] = [None] * len(sequences)
    chunks = (_tree_token_chunks([sequences[i] for i in order], token_budget) if token_budget
              else [(s, s + micro_batch) for s in range(0, len(order), micro_batch)])
    for start, end in chunks:
        chunk = order[start:end]
        scores = shared_prefix_logprobs(model, [sequences[i] for i in chunk], [len(prompts[i]) for i in chunk],
                                        pad_id=pad_id, min_shared=min_shared, precision=precision)
        for i, lp in zip(chunk, scores):
            out[i] = lp
    return out   # type: ignore[return-value]


def _tree_token_chunks(sorted_sequences: Sequence[Sequence[int]], token_budget: int) -> list[tuple[int, int]]:
    """[start, end) runs of the sorted sequences whose prefix tree holds at most `token_budget`
    tokens (a sequence adds its tokens after its common prefix with the one before it; one
    longer than the budget goes alone)."""
    chunks: list[tuple[int, int]] = []
    start, tokens, previous = 0, 0, np.zeros(0, dtype=np.int64)
    for k, sequence in enumerate(sorted_sequences):
        current = np.asarray(sequence, dtype=np.int64)
        n = min(len(current), len(previous))
        differ = np.flatnonzero(current[:n] != previous[:n])
        new = len(current) - (int(differ[0]) if len(differ) else n)
        if k > start and tokens + new > token_budget:
            chunks.append((start, k))
            start, new = k, len(current)
        tokens = new if k == start else tokens + new
        previous = current
    if len(sorted_sequences):
        chunks.append((start, len(sorted_sequences)))
    return chunks


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def _gathered_cache(keys, values, parents, room: int):
    """A frozen model's cache for a batch of tree nodes: per layer, a buffer holding the parent
    rows' keys and values (gathered straight into place) with `room` positions after, which the
    forward writes into (engine.kv_cache.BufferLayer). transformers' DynamicCache would gather
    them and then concatenate the new keys, copying the parents' keys twice in every layer (a
    tenth of the SmolLM2 teacher's scoring time); its values are the same. Trainable models keep
    DynamicCache: their recomputed old log-probs and the update must be one computation."""
    from atod_edge.engine.kv_cache import buffer_cache

    past = keys[0].shape[2]
    cache = buffer_cache(len(keys), past + room)
    for layer, k, v in zip(cache.layers, keys, values):
        gathered = [x.new_empty((len(parents), x.shape[1], past + room, x.shape[3])) for x in (k, v)]
        for source, buffer in zip((k, v), gathered):
            torch.index_select(source, 0, parents, out=buffer[:, :, :past])
        layer.adopt(*gathered, past)
    return cache


def _attention_mask(model, past: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """The attention mask of a batch of tree nodes: 2-D (past keys, then the nodes' own tokens,
    1 = real) for the model to expand, or, under SDPA attention, the 4-D boolean mask it would
    build from that (a key is seen where it is real and not after the query), built directly:
    transformers builds it with torch.vmap, a fifth of the scoring time on the tiny presets."""
    from atod_edge.engine.attention import is_sdpa

    if not is_sdpa(model.config):
        return torch.cat([past, own], dim=1)
    width = own.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=own.device).tril()
    past_keys = past.bool()[:, None, None, :].expand(-1, 1, width, -1)
    own_keys = causal[None, None] & own.bool()[:, None, None, :]
    return torch.cat([past_keys, own_keys], dim=-1)


def _features(model, ids, mask, positions, cache, rows, cols):
    """(hidden states at (rows, cols), the LM head, the cache), or (logits there, None, cache)
    for a model whose head cannot run apart from its forward (logit soft-capping)."""
    head = model.get_output_embeddings()
    decoder = getattr(model, "model", None)
    if head is None or decoder is None or getattr(model.config, "final_logit_softcapping", None):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        return out.logits[rows, cols], None, out.past_key_values
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    return out.last_hidden_state[rows, cols], head, out.past_key_values


def prefix_reuse_applies(model) -> bool:
    """Whether shared_prefix_logprobs can run this model exactly: every layer attends to the full
    context (a sliding-window layer masks by cache index, which the padded tree levels shift),
    and the forward keeps a cache (gradient checkpointing turns it off in training).

    The answer does not depend on train or eval mode: the old log-probs (recomputed in eval
    mode, no grad) and the update (train mode) must take the same path, or under bf16 the first
    epoch's ratio is not 1 (the tree and the padded forward round differently). A model with
    gradient checkpointing enabled therefore takes the padded path in both."""
    from atod_edge.engine.kv_cache import supports_prefix_cache

    if getattr(model, "is_gradient_checkpointing", False):
        return False
    return supports_prefix_cache(model.config)
