"""The update's forward + backward of one model on one batch, fp32 against bf16 autocast, through the
plain per-turn path (scoring.logprobs.response_logprobs), alternating, best of `--repeats`.

    OMP_NUM_THREADS=2 taskset -c 0,1 python benchmarks/bench_update_precision.py [--model DIR]

A probe of where the SmolLM2 step loses bf16's gain (benchmarks/results/smollm2-household/step.md):
the same tokens the trainer's update sees, without its prefix trees. Default model: bench_rollout's
SmolLM2 cut (every third layer), made when missing. Prints seconds per path.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_rollout import ensure_smollm2_cut


def forward_backward(model, prompts, responses, precision: str) -> float:
    import torch

    from atod_edge.scoring.logprobs import response_logprobs

    started = time.perf_counter()
    lps = response_logprobs(model, prompts, responses, micro_batch=len(prompts), precision=precision)
    (-torch.cat(lps).sum()).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache/atod-edge/bench/smollm2-135m-every3"))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--response-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    why = ensure_smollm2_cut(Path(args.model), print) if not Path(args.model, "config.json").is_file() else None
    if why:
        raise SystemExit(why)
    from atod_edge.models.loading import load_model

    model, _ = load_model(args.model)
    model.train()
    prompts = [[1] + list(range(100, 100 + args.prompt_tokens)) for _ in range(args.rows)]
    responses = [list(range(500, 500 + args.response_tokens)) for _ in range(args.rows)]
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for round_ in range(args.repeats + 1):
        for precision in best:
            seconds = forward_backward(model, prompts, responses, precision)
            if round_:   # the first round warms up
                best[precision] = min(best[precision], seconds)
    tokens = args.rows * (1 + args.prompt_tokens + args.response_tokens)
    print(f"{args.rows} rows x {tokens // args.rows} tokens: fp32 {best['fp32']:.2f} s, bf16 {best['bf16']:.2f} s "
          f"({best['fp32'] / best['bf16']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
