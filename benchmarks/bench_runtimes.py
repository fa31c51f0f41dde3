"""Decode speed and first-action latency of every runtime, against the memory-bandwidth bound.

    python benchmarks/bench_runtimes.py                 # tiny-student
    python benchmarks/bench_runtimes.py --smollm2       # + a SmolLM2-135M-derived student
    python benchmarks/bench_runtimes.py --model DIR     # any checkpoint (repeatable)

For each model, in one run: PyTorch (fp32, KV-cache loop), ONNX Runtime (fp32, int8) and
llama.cpp (f16, q8_0, q4_k_m), all through the same policy interface, one sequence at a time on
household prompts. Columns:

    first token    prefill + one decode step (median over prompts)
    first action   the agent's first turn: prompt -> response (greedy, up to 48 tokens, stops at
                   </action> or end of turn)
    Agent first    atod_edge.Agent.act on a fresh household episode: prompt building, generation and
    action         parsing, what an application embedding the agent waits for (median of 3 tasks)
    decode tok/s   generated tokens per second after the first
    bound tok/s    copy bandwidth / model bytes: each decoded token streams every weight once,
                   so no runtime can beat this when weights do not fit in cache
    % of bound     how close the runtime is to the limit

Copy bandwidth is measured here with numpy (STREAM "copy" convention: bytes read + written).
Tiny models fit in CPU caches, so for them the bound is loose and per-step overhead dominates.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second moved by a large numpy copy (read + write), best of `repeats`."""
    src = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def torch_weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:       # tied embeddings count once
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def first_action_latency(policy, prompts, repeats: int = 3) -> float:
    from atod_edge.engine.sampling import SamplingParams

    sampling = SamplingParams(max_new_tokens=48, temperature=0.0)
    times = []
    for prompt in prompts[:repeats]:
        t0 = time.perf_counter()
        policy.generate([prompt], sampling)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def agent_first_action_latency(policy, tasks: int = 3) -> float:
    """Median wall time of Agent.act's first turn over `tasks` household eval episodes."""
    from atod_edge import Agent
    from atod_edge.envs import make_env

    env = make_env("household")
    agent = Agent(policy, env_instructions=env.instructions)
    times = []
    for task in env.tasks("eval", tasks, start=500):
        observation = env.reset(task)
        agent.reset(observation)
        times.append(agent.act(observation, env.admissible_actions()).seconds)
    return float(np.median(times))


def bench_model(model: str, work: Path, tokens: int, threads: int | None, bandwidth: float) -> list[dict]:
    from atod_edge.engine.backends.llamacpp import LlamaCppPolicy
    from atod_edge.engine.backends.ort import OrtPolicy
    from atod_edge.export import export_model
    from atod_edge.export.verify import VerifyConfig, decode_speed, file_bytes, heldout_contexts
    from atod_edge.engine.policy import TorchPolicy

    print(f"[{model}] exporting to {work}", file=sys.stderr, flush=True)
    export_model(model, work, onnx=True, int8=True, gguf_quants=["f16", "q8_0", "q4_k_m"],
                 verify=False, n_threads=threads)
    torch_policy = TorchPolicy.load(model)
    if threads:
        import torch

        torch.set_num_threads(threads)
    contexts, _ = heldout_contexts(torch_policy.tokenizer, VerifyConfig(n_contexts=6, n_episodes=0))
    prompts = [c.prompt_ids for c in contexts]

    runtimes = [
        ("pytorch", "fp32", lambda: torch_policy, torch_weight_bytes(torch_policy.model)),
        ("onnxruntime", "fp32", lambda: OrtPolicy.load(str(work / "onnx/model.onnx"), device="cpu",
                                                       n_threads=threads), None),
        ("onnxruntime", "int8", lambda: OrtPolicy.load(str(work / "onnx/model.int8.onnx"), device="cpu",
                                                       n_threads=threads), None),
    ] + [("llama.cpp", q, lambda q=q: LlamaCppPolicy.load(str(work / f"agent.{q}.gguf"), n_threads=threads),
          None) for q in ("f16", "q8_0", "q4_k_m")]
    files = {("onnxruntime", "fp32"): work / "onnx/model.onnx", ("onnxruntime", "int8"): work / "onnx/model.int8.onnx",
             **{("llama.cpp", q): work / f"agent.{q}.gguf" for q in ("f16", "q8_0", "q4_k_m")}}

    rows = []
    for runtime, kind, open_policy, weight_bytes in runtimes:
        print(f"[{model}] {runtime} {kind}", file=sys.stderr, flush=True)
        policy = open_policy()
        nbytes = weight_bytes or file_bytes(files[(runtime, kind)])
        speed = decode_speed(policy, prompts, tokens)
        rate = speed["decode_tokens_per_s"]
        bound = bandwidth / nbytes
        rows.append({"model": model, "runtime": runtime, "type": kind, "bytes": nbytes,
                     "first_token_s": speed["first_token_s"],
                     "first_action_s": first_action_latency(policy, prompts),
                     "agent_first_action_s": agent_first_action_latency(policy),
                     "decode_tokens_per_s": rate, "bound_tokens_per_s": bound,
                     "percent_of_bound": None if rate is None else 100 * rate / bound,
                     "providers": getattr(policy, "providers", None)})
        if policy is not torch_policy:
            policy.close()
    return rows


def smollm2_student(work: Path) -> str:
    """A compact student cut from SmolLM2-135M-Instruct: every 3rd layer (11 of 30)."""
    from atod_edge.models.presets import resolve_model
    from atod_edge.models.surgery import shrink_model

    return str(shrink_model(resolve_model("smollm2-135m"), "every:3", work / "smollm2-student"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="preset or checkpoint dir (repeatable)")
    parser.add_argument("--smollm2", action="store_true", help="also the SmolLM2-135M-derived student")
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens timed per runtime")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--work", help="keep the exported files here (default: a temporary dir)")
    parser.add_argument("--json", help="also write the rows (and the copy bandwidth) to this JSON file")
    args = parser.parse_args(argv)

    models = args.model or ["tiny-student"]
    bandwidth = copy_bandwidth()
    with tempfile.TemporaryDirectory(prefix="atod-bench-") as tmp:
        work = Path(args.work or tmp)
        if args.smollm2:
            models.append(smollm2_student(work))
        rows = []
        for i, model in enumerate(models):
            rows += bench_model(model, work / f"export-{i}", args.tokens, args.threads, bandwidth)

    if args.json:
        from atod_edge.io import atomic_write_json

        atomic_write_json(args.json, {"copy_bandwidth_bytes_per_s": bandwidth, "threads": args.threads,
                                      "rows": rows})
    print(f"\ncopy bandwidth: {bandwidth / 1e9:.2f} GB/s (numpy copy, read + write)")
    header = ("| model | runtime | type | MiB | first token ms | first action ms | Agent first action ms | "
              "decode tok/s | bound tok/s | % of bound |")
    print(header)
    print("|---" * 10 + "|")
    for r in rows:
        rate = "-" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:.0f}"
        pct = "-" if r["percent_of_bound"] is None else f"{r['percent_of_bound']:.1f}"
        print(f"| {Path(r['model']).name} | {r['runtime']} | {r['type']} | {r['bytes'] / 2**20:.1f} | "
              f"{1000 * r['first_token_s']:.1f} | {1000 * r['first_action_s']:.1f} | "
              f"{1000 * r['agent_first_action_s']:.1f} | {rate} | "
              f"{r['bound_tokens_per_s']:.0f} | {pct} |")
    providers = {tuple(r["providers"]) for r in rows if r["providers"]}
    if providers:
        print(f"\nONNX Runtime providers in use: {', '.join(sorted({p for ps in providers for p in ps}))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
