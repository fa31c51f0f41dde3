"""What the machine allows: measured memory bandwidth and matmul peak, and a model's cost per
decode step (bytes read, FLOPs), hence the bound on decode speed that bench_rollout.py and
bench_step.py print next to what the engine achieves.

    python benchmarks/machine_bounds.py [--model tiny-student] [--batch 16] [--context 512]

Measured, not looked up:
- memory bandwidth: a large copy (numpy np.copyto, one thread; torch Tensor.copy_, torch's
  threads), counted as bytes read + bytes written per second, and a large read (torch sum); the
  buffers (1 GiB by default) are far larger than the last-level cache. The bound uses the best of
  these. The same copy at the model's own working-set size is reported too: a model whose weights
  fit in the cache is not held to DRAM's speed;
- matmul peak: torch.matmul of the model's own decode shapes (batch x hidden by hidden x
  q/kv/up/LM-head widths) and of a large square, in float32 and bfloat16; the peak of a dtype is
  the best of its shapes.

A decode step of a batch of B rows at context L reads every weight the step uses once (the
decoder's and the LM head's; the input embedding only by row) and each row's KV cache
(2 x layers x kv_heads x head_dim x L elements), and runs 2 FLOPs per weight per row plus the
attention's 4 x layers x heads x head_dim x L per row. Its time is bounded below by
max(bytes / bandwidth, FLOPs / peak): the bound assumes perfect overlap and no other work, so
real engines reach a fraction of it.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache's size (Linux sysfs), or None."""
    from pathlib import Path

    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * unit)
        except ValueError:
            pass
    return max(sizes) if sizes else None


def _best(fn, repeats: int) -> float:
    """Best wall time of fn() over `repeats` runs (one untimed warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(megabytes: int = 1024, repeats: int = 5) -> dict:
    """Bytes per second of a large copy (read + write counted) and of a large read, in GB/s."""
    import numpy as np
    import torch

    n = (megabytes << 20) // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    numpy_copy = 2 * src.nbytes / _best(lambda: np.copyto(dst, src), repeats)
    tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
    torch_copy = 2 * src.nbytes / _best(lambda: tdst.copy_(tsrc), repeats)
    torch_read = src.nbytes / _best(lambda: tsrc.sum(), repeats)
    del src, dst, tsrc, tdst
    rates = {"numpy_copy": numpy_copy / 1e9, "torch_copy": torch_copy / 1e9, "torch_read": torch_read / 1e9}
    best = max(rates, key=rates.get)
    return {"gb_s": rates[best], "best_of": best, "buffer_mb": megabytes,
            **{f"{k}_gb_s": v for k, v in rates.items()}}


def model_dims(config) -> dict:
    from atod_edge.models.loading import decoder_dims

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return {"hidden": text.hidden_size, "intermediate": text.intermediate_size, **decoder_dims(text),
            "vocab": text.vocab_size, "tied": bool(getattr(text, "tie_word_embeddings", False))}


def parameter_counts(model) -> dict:
    """Parameters a forward multiplies by: the decoder's ("body": every weight but the input
    embedding) and the LM head's (counted even when tied to the embedding: it is read whole)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters() if p is not embed and p is not head)
    return {"body": body, "head": head.numel(), "embedding": embed.numel(),
            "total": sum(p.numel() for p in model.parameters())}


def matmul_rates(shapes, dtypes=("float32", "bfloat16"), seconds: float = 0.3, device: str = "cpu") -> list[dict]:
    """GFLOP/s of torch.matmul for each (M, K, N) and dtype: the best of many short trials
    (~1 ms each) in `seconds`, so a machine shared with other jobs still shows its peak."""
    import torch

    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
            for _ in range(3):
                a @ b
            reps = max(1, int(1e-3 / max(_timed_reps(a, b, 1), 1e-7)))
            best, end = float("inf"), time.perf_counter() + seconds
            while time.perf_counter() < end:
                best = min(best, _timed_reps(a, b, reps))
            rows.append({"m": m, "k": k, "n": n, "dtype": dtype_name, "ms": best * 1e3,
                         "gflop_s": 2 * m * k * n / best / 1e9})
    return rows


def _timed_reps(a, b, reps: int) -> float:
    import torch

    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return (time.perf_counter() - t0) / reps


def model_shapes(dims: dict, batch: int) -> list[tuple[int, int, int]]:
    h = dims["hidden"]
    return sorted({(batch, h, dims["heads"] * dims["head_dim"]), (batch, h, dims["kv_heads"] * dims["head_dim"]),
                   (batch, h, dims["intermediate"]), (batch, dims["intermediate"], h), (batch, h, dims["vocab"])})


def matmul_peak(dims: dict | None = None, batch: int = 16, square: int = 1024) -> dict:
    """Peak GFLOP/s per dtype: the best of the model's decode shapes and a large square."""
    shapes = (model_shapes(dims, batch) if dims else []) + [(square, square, square)]
    rows = matmul_rates(shapes)
    peak = {d: max(r["gflop_s"] for r in rows if r["dtype"] == d) for d in ("float32", "bfloat16")}
    return {"gflop_s": peak, "shapes": rows}


def decode_step_cost(model, batch: int, context: float, weight_bytes: int = 4, kv_bytes: int = 4) -> dict:
    """Bytes read and FLOPs of one decode step of `batch` rows at mean context `context`."""
    dims, counts = model_dims(model.config), parameter_counts(model)
    weights = (counts["body"] + counts["head"]) * weight_bytes
    kv = batch * context * 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * kv_bytes
    flops = batch * (2 * (counts["body"] + counts["head"])
                     + 4 * dims["layers"] * dims["heads"] * dims["head_dim"] * context)
    return {"batch": batch, "context": context, "weight_bytes": weights, "kv_bytes": kv,
            "bytes": weights + kv, "flops": flops, "weight_element_bytes": weight_bytes}


def bound(cost: dict, bandwidth_gb_s: float, peak_gflop_s: float) -> dict:
    """The lower bound on a decode step's time: max(bytes / bandwidth, FLOPs / peak)."""
    memory_s = cost["bytes"] / (bandwidth_gb_s * 1e9)
    compute_s = cost["flops"] / (peak_gflop_s * 1e9)
    step = max(memory_s, compute_s)
    return {"memory_ms": memory_s * 1e3, "compute_ms": compute_s * 1e3, "step_ms": step * 1e3,
            "bound_by": "memory" if memory_s >= compute_s else "compute",
            "tokens_per_s": cost["batch"] / step}


def trie_work(sequences, min_shared: int | None = None) -> tuple[int, int]:
    """(tokens, attended (query, key) pairs) of one forward over the prefix tree of the sequences
    (scoring.prefix_tree, with its `min_shared`; 1: every shared prefix token once): a node's token
    at position p attends to the p + 1 keys up to it."""
    from atod_edge.scoring.prefix_tree import MIN_SHARED_TOKENS, prefix_tree

    nodes, _ = prefix_tree([s for s in sequences if len(s)], MIN_SHARED_TOKENS if min_shared is None else min_shared)
    tokens = sum(n.end - n.start for n in nodes)
    pairs = sum((n.end * (n.end + 1) - n.start * (n.start + 1)) // 2 for n in nodes)
    return tokens, pairs


def forward_flops(model, tokens: float, head_positions: float, attended: float = 0.0) -> float:
    """FLOPs of a forward over `tokens` positions, the LM head on `head_positions` of them, and
    `attended` (query, key) pairs in all (attention: 4 x layers x heads x head_dim per pair)."""
    dims, counts = model_dims(model.config), parameter_counts(model)
    return (2 * counts["body"] * tokens + 2 * counts["head"] * head_positions
            + 4 * dims["layers"] * dims["heads"] * dims["head_dim"] * attended)


def main() -> None:
    import torch

    from atod_edge.models.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-student")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=float, default=512)
    args = parser.parse_args()
    model, _ = load_model(args.model)
    dims = model_dims(model.config)
    bw = memory_bandwidth()
    peak = matmul_peak(dims, args.batch)
    cost = decode_step_cost(model, args.batch, args.context)
    result = {"load_average": load_average(), "torch_threads": torch.get_num_threads(), "bandwidth": bw,
              "matmul_peak": peak, "dims": dims, "params": parameter_counts(model), "decode_step": cost,
              "bound_fp32": bound(cost, bw["gb_s"], peak["gflop_s"]["float32"])}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
