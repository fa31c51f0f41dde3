"""CUDA smoke run: the same code paths the CPU tests cover, on a GPU.

    python benchmarks/cuda_smoke.py [--steps 3]

Checks that batched generation, teacher scoring and the ATOD update run on CUDA (bf16 autocast),
that CUDA and CPU log-probs agree within bf16 tolerance, and reports seconds per training step
and peak GPU memory for each algo. Prints one JSON line per check.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def main() -> int:
    import torch

    from atod_edge.config import load_config
    from atod_edge.envs import make_env
    from atod_edge.models import load_model
    from atod_edge.policy import SamplingParams, TorchPolicy
    from atod_edge.rollout import run_episodes
    from atod_edge.scoring import response_logprobs, turn_pairs
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.trainer import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"check": "cuda", "ok": False, "reason": "no CUDA device"}))
        return 1
    print(json.dumps({"check": "cuda", "device": torch.cuda.get_device_name(0), "torch": torch.__version__}))

    # generation on CUDA, scoring on CUDA vs CPU
    student, tokenizer = load_model("tiny-student", device="cuda")
    policy = TorchPolicy(student, tokenizer, device="cuda")
    tasks = make_env("household").tasks("train", 8)
    t0 = time.perf_counter()
    episodes = run_episodes(policy, "household", tasks, group_size=4, max_turns=4,
                            sampling=SamplingParams(max_new_tokens=16))
    torch.cuda.synchronize()
    print(json.dumps({"check": "rollout", "episodes": len(episodes), "seconds": time.perf_counter() - t0}))
    prompts, responses, _ = turn_pairs(episodes)
    with torch.inference_mode():
        gpu = torch.cat(response_logprobs(student, prompts, responses)).cpu()
        cpu_model, _ = load_model("tiny-student", device="cpu")
        cpu = torch.cat(response_logprobs(cpu_model, prompts, responses))
        recorded = torch.tensor([lp for ep in episodes for t in ep.turns for lp in t.student_logprobs])
    print(json.dumps({"check": "logprob agreement (bf16 autocast vs fp32 CPU)",
                      "max_abs_diff_scoring": float((gpu - cpu).abs().max()),
                      "max_abs_diff_rollout_vs_cpu": float((recorded - cpu).abs().max())}))

    # a few training steps per algo, teacher on the same GPU
    for algo in ("atod", "opd", "grpo"):
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = load_config(TrainConfig, None, [
                f"algo={algo}", "device=cuda", f"steps={args.steps}", "tasks_per_step=8", "group_size=4",
                "max_turns=6", "max_new_tokens=16", "eval_episodes=0", "lr=1e-4", "checkpoint_every=100",
                "sample_episodes=0", "compare=false", "micro_batch=64"])
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            train(cfg, run_dir, "tiny-student", "tiny-teacher", log=lambda *a: None)
            rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
            print(json.dumps({"check": f"train {algo}", "steps": len(rows),
                              "seconds_per_step": (time.perf_counter() - t0) / args.steps,
                              "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
                              "loss": [round(r["loss"], 4) for r in rows],
                              "kappa_rho": [(round(r["kappa"], 3), round(r["rho"], 3)) for r in rows],
                              "phase_seconds": {k: round(sum(r[k] for r in rows), 2)
                                                for k in ("time_rollout", "time_teacher", "time_update")}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
