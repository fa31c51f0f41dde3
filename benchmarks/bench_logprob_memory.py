"""Peak memory of the sampled-token log-probs in the update: the full [tokens, vocab] log-softmax
(the old scoring code) against `atod_edge.scoring.sampled_logprobs` (chunks of positions,
recomputed in backward). Forward and backward through an LM head, measured in one run.

    python benchmarks/bench_logprob_memory.py [--tokens 4096] [--vocab 32768] [--hidden 64]
                                              [--chunk 512] [--device cpu|cuda] [--out FILE.json]

CPU: the peak resident set size during each variant (Linux VmHWM, reset through
/proc/self/clear_refs right before it), minus the resident size before it, in a child process
with MALLOC_MMAP_THRESHOLD_ set so that glibc maps every tensor-sized block and unmaps it when
freed (otherwise freed blocks below 32 MB stay in the heap and the peak measures the allocator's
fragmentation, not the tensors). CUDA: the peak of torch.cuda.max_memory_allocated above the
memory allocated before it. The GPU recipe's batch is
8 turns x 512 tokens = 4,096 response positions at Qwen's 151,936-token vocabulary (2.5 GB per
[tokens, vocab] fp32 copy); the default here keeps the 4,096 positions at a 32k vocabulary (0.5 GB
a copy) so it fits a shared CPU machine (benchmarks/cuda_smoke.py runs the full shape on a GPU).
Peak memory scales with tokens x vocab for the full log-softmax and with chunk x vocab chunked.
Prints one JSON object (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_bytes(fn, device: str) -> int:
    """Peak memory `fn()` adds above what was in use before it (bytes)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    Path("/proc/self/clear_refs").write_text("5")   # VmHWM := current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def variants(tokens: int, vocab: int, hidden: int, chunk: int, device: str, seed: int = 0):
    """(name, function) pairs; each runs forward + backward of the summed log-probs of `tokens`
    sampled tokens through a [vocab, hidden] LM head."""
    import torch

    from atod_edge.scoring.tokens import sampled_logprobs

    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(tokens, hidden, generator=generator).to(device).requires_grad_(True)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device)
    targets = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    results: dict[str, torch.Tensor] = {}

    def full():
        logp = torch.log_softmax(head(features).float(), dim=-1)
        picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        picked.sum().backward()
        results["full"] = picked.detach()

    def chunked():
        picked = sampled_logprobs(features, targets, head=head, chunk_tokens=chunk)
        picked.sum().backward()
        results["chunked"] = picked.detach()

    return [("chunked", chunked), ("full", full)], results, (features, head)


def measure(tokens: int, vocab: int, hidden: int, chunk: int, device: str = "cpu") -> dict:
    import torch

    for _name, fn in variants(2 * min(chunk, tokens), 1024, hidden, min(chunk, tokens), device)[0]:
        fn()   # warm-up: first-use allocations (thread pools, autograd, kernels) are not either's
    runs, results, (features, head) = variants(tokens, vocab, hidden, chunk, device)
    row: dict = {"tokens": tokens, "vocab": vocab, "hidden": hidden, "chunk_tokens": chunk, "device": device,
                 "torch": torch.__version__, "one_copy_mib": tokens * vocab * 4 / 2**20}
    for name, fn in runs:   # chunked first: anything it leaves cached only lowers full's delta
        features.grad, head.weight.grad = None, None
        started = time.perf_counter()
        row[f"{name}_peak_mib"] = peak_bytes(fn, device) / 2**20
        row[f"{name}_seconds"] = time.perf_counter() - started
    row["max_abs_diff"] = float((results["full"] - results["chunked"]).abs().max())
    row["peak_ratio"] = row["full_peak_mib"] / max(row["chunked_peak_mib"], 1e-9)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        print("bench_logprob_memory: CPU peak memory needs Linux /proc/self/clear_refs", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.child:   # measure in a child with the allocator set up
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child"]
        return subprocess.run(child, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")).returncode
    row = measure(args.tokens, args.vocab, args.hidden, args.chunk, args.device)
    text = json.dumps(row, indent=1, sort_keys=True)
    print(text)
    if args.out:
        from atod_edge.io import atomic_write_text

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
