"""The CPU kernels issue 27's changes rest on, each A/B in one run at the SmolLM2 cut's shapes.

    OMP_NUM_THREADS=2 taskset -c 0,1 python benchmarks/bench_cpu_kernels.py [--samples STEP.jsonl]

- the LM head's fp32 matmul [512 x 576] x [576 x 49,152]: IEEE fp32 vs oneDNN's bf16 mode
  (scoring.tokens.head_matmuls: bf16 inputs, fp32 accumulation and output), for scale the same
  matmul on bf16 copies of both operands (bf16 out: other values), and the log-sum-exp of
  its logits: torch.logsumexp vs scoring.tokens.log_sum_exp_ (the same steps in place);
- attention forward + backward at the prefix tree's shapes (query [16, 9, 47, 64] over 326 keys, 3
  KV heads, a padding mask), bf16 inputs: transformers' SDPA path (repeat_kv), the folded SDPA
  (engine.attention) in bf16, and folded in fp32 (atod_folded_sdpa_fp32);
- a decode step at batch 16 of the SmolLM2 cut's bf16 rollout copy, blocked weights (PackedLinear)
  vs plain ones (bench_rollout.decode_step_ms, alternating);
- with --samples (a run's samples/step_N.jsonl: turns with prompt_ids and response_ids), the
  update's prefix-tree pass (forward + backward) over those turns in fp32 and bf16.

Best of --repeats for each; writes benchmarks/results/smollm2-household/kernels.json and kernels.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench_rollout import decode_step_ms, ensure_smollm2_cut

from atod_edge.io import atomic_write_json, atomic_write_text, cache_dir

OUT = Path(__file__).parent / "results" / "smollm2-household"


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def head_rows(repeats: int) -> list[dict]:
    import torch

    from atod_edge.scoring.tokens import head_matmuls, log_sum_exp_

    x, w = torch.randn(512, 576), torch.randn(49152, 576) * 0.05
    rows = []
    for low in (False, True):
        with torch.inference_mode(), head_matmuls(x.device, low):
            ms = best_ms(lambda: torch.nn.functional.linear(x, w), repeats)
        rows.append({"kernel": "LM head [512 x 576] x [576 x 49152], fp32 out",
                     "variant": "oneDNN bf16 mode" if low else "IEEE fp32", "ms": ms})
    # what oneDNN's bf16 mode pays to read fp32 operands (the 113 MB master weight converted inside
    # every call) and write fp32 logits: the same matmul on bf16 copies, bf16 out (other values)
    xb, wb = x.bfloat16(), w.bfloat16()
    with torch.inference_mode():
        ms = best_ms(lambda: torch.nn.functional.linear(xb, wb), repeats)
    rows.append({"kernel": "LM head [512 x 576] x [576 x 49152], fp32 out",
                 "variant": "for scale: bf16 weight and input, bf16 out", "ms": ms})
    logits = torch.nn.functional.linear(x, w)
    for name, op in (("torch.logsumexp", lambda y: torch.logsumexp(y, -1)), ("in place (log_sum_exp_)", log_sum_exp_)):
        times = []
        for _ in range(repeats + 1):      # each on a fresh copy of the logits (the in-place one overwrites them)
            y = logits.clone()
            started = time.perf_counter()
            op(y)
            times.append(time.perf_counter() - started)
        rows.append({"kernel": "log-sum-exp of [512 x 49152] fp32 logits", "variant": name, "ms": min(times[1:]) * 1e3})
    return rows


def attention_rows(repeats: int) -> list[dict]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from atod_edge.engine.attention import folded_sdpa_forward, folded_sdpa_fp32_forward

    class Module:
        num_key_value_groups = 3
        is_causal = True

    torch.manual_seed(0)
    batch, heads, kv_heads, q, keys, dim = 16, 9, 3, 47, 326, 64
    query = torch.randn(batch, heads, q, dim, dtype=torch.bfloat16, requires_grad=True)
    key, value = (torch.randn(batch, kv_heads, keys, dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    mask = torch.ones(batch, 1, q, keys, dtype=torch.bool)
    mask[:, :, :, -q:] = torch.ones(q, q, dtype=torch.bool).tril()
    mask[:4, :, :, :20] = False
    grad = torch.randn(batch, q, heads, dim, dtype=torch.bfloat16)
    rows = []
    for name, fn in (("transformers SDPA (repeat_kv), bf16", sdpa_attention_forward),
                     ("folded SDPA, bf16", folded_sdpa_forward), ("folded SDPA in fp32", folded_sdpa_fp32_forward)):
        def step():
            out, _ = fn(Module(), query, key, value, mask, scaling=dim ** -0.5)
            out.backward(grad)
        rows.append({"kernel": "attention fwd + bwd, query [16, 9, 47, 64] over 326 keys", "variant": name,
                     "ms": best_ms(step, repeats)})
    return rows


def decode_rows(model, tokenizer, repeats: int) -> list[dict]:
    from atod_edge.engine import rollout_copy as rollout_copy_module
    from atod_edge.engine.policy import TorchPolicy

    copy = rollout_copy_module.rollout_copy(model)
    policy = TorchPolicy(copy, tokenizer, precision="bf16")
    prompts = [[1] + [100 + (i * 7 + j * 13) % 3000 for j in range(260 + i)] for i in range(16)]
    best = {}
    default = rollout_copy_module.PACKED_MAX_ROWS
    try:
        for _ in range(2):   # alternating, best of each
            for name, rows in (("blocked weights (PackedLinear)", default), ("plain weights", 0)):
                rollout_copy_module.PACKED_MAX_ROWS = rows
                ms = decode_step_ms(policy, prompts, 24, repeats=repeats)["wall"]
                best[name] = min(best.get(name, float("inf")), ms)
    finally:
        rollout_copy_module.PACKED_MAX_ROWS = default
    return [{"kernel": "decode step at batch 16, bf16 rollout copy, context ~290", "variant": k, "ms": v}
            for k, v in best.items()]


def tree_rows(model, samples: Path, repeats: int) -> list[dict]:
    import torch

    from atod_edge.scoring.prefix_tree import shared_response_logprobs

    turns = [t for line in samples.read_text().splitlines() if line.strip()
             for t in json.loads(line)["turns"] if t.get("prompt_ids") and t.get("response_ids")]
    prompts, responses = [t["prompt_ids"] for t in turns], [t["response_ids"] for t in turns]
    model.train()
    rows = []
    for precision in ("fp32", "bf16"):
        def step():
            lps = shared_response_logprobs(model, prompts, responses, micro_batch=16, precision=precision)
            (-torch.cat(lps).sum()).backward()
            model.zero_grad(set_to_none=True)
        rows.append({"kernel": f"update's prefix-tree pass, fwd + bwd, {len(turns)} turns of {samples.name}",
                     "variant": precision, "ms": best_ms(step, repeats)})
    model.eval()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(cache_dir() / "bench" / "smollm2-135m-every3"))
    parser.add_argument("--samples", type=Path, help="a run's samples/step_N.jsonl (adds the tree pass)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import torch

    why = ensure_smollm2_cut(Path(args.model), print) if not Path(args.model, "config.json").is_file() else None
    if why:
        raise SystemExit(why)
    from atod_edge.models.loading import load_model

    model, tokenizer = load_model(args.model)
    rows = head_rows(args.repeats) + attention_rows(args.repeats) + decode_rows(model, tokenizer, 2)
    if args.samples:
        rows += tree_rows(model, args.samples, 1)
    command = ("OMP_NUM_THREADS=2 taskset -c 0,1 python benchmarks/bench_cpu_kernels.py"
               + (f" --samples {args.samples.name}" if args.samples else ""))
    result = {"command": command, "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "kernels.json", result)
    lines = ["# CPU kernels at the SmolLM2 cut's shapes", "", f"`{command}` ({result['torch_threads']} torch threads; "
             "best of each, A/B in one run). See the script's docstring for the shapes.", "",
             "| kernel | variant | ms |", "|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['variant']} | {r['ms']:.2f} |" for r in rows]
    atomic_write_text(args.out / "kernels.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
