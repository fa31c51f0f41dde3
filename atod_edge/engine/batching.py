"""How the engine cuts work into forward calls: the padding-minimizing batching of sequences of
different lengths, shared by the engine's prefill and the teacher's prefix-tree scoring."""

from __future__ import annotations

from typing import Sequence


def length_batches(lengths: Sequence[int], call_cost: int = 128) -> list[list[int]]:
    """Split sequences of these token counts into batches (each right- or left-padded to its
    longest) that minimize the padded tokens computed, sum of (rows x longest), plus `call_cost`
    tokens' worth per forward call. Exact dynamic programming over the lengths sorted longest
    first (batches are runs of that order). Returns the batches as lists of indices into
    `lengths`, ascending. Used by the engine's prefill and by atod_edge.scoring.prefix_tree."""
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
