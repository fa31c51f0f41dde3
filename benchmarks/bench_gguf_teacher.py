"""Teacher scoring speed: the same teacher in torch (atod_edge.scoring) and from GGUF files in
llama.cpp (atod_edge.backends.llamacpp_teacher), on the same recorded student episodes.

    python benchmarks/bench_gguf_teacher.py [--teacher tiny-teacher] [--tasks 8] [--group 4]
                                            [--quants f32,q8_0,q4_k_m] [--threads 2] [--out FILE.json]

Records the student's episodes once (household train tasks, G rollouts each, like a training
step), then scores them with each teacher and prints response tokens scored per second (the
quantity a training step waits for), the share of tokens llama.cpp took from its KV cache, and
the largest |lp_T difference| from the torch teacher. Each scorer runs once untimed (warm-up)
and then `--repeats` times; the best time counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch

    from atod_edge.scoring.llamacpp_teacher import LlamaCppTeacher
    from atod_edge.envs import env_class
    from atod_edge.rollout.episode import Episode
    from atod_edge.export.gguf import quantize_gguf, write_gguf
    from atod_edge.models.loading import load_model
    from atod_edge.models.presets import resolve_model
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.rollout.runner import run_episodes
    from atod_edge.scoring.logprobs import score_episodes

    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default="tiny-teacher")
    parser.add_argument("--student", default="tiny-student")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-turns", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--quants", default="f32,q8_0,q4_k_m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    student, tokenizer = load_model(args.student)
    env_cls = env_class("household")
    episodes = run_episodes(TorchPolicy(student, tokenizer, name=args.student), env_cls,
                            env_cls().tasks("train", args.tasks), group_size=args.group,
                            sampling=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0),
                            seed=0, max_turns=args.max_turns)
    turns = [t for ep in episodes for t in ep.turns if t.response_ids]
    response_tokens = sum(len(t.response_ids) for t in turns)
    all_tokens = response_tokens + sum(len(t.prompt_ids) for t in turns)
    print(f"recorded {len(episodes)} episodes, {len(turns)} turns, {response_tokens} response tokens "
          f"({all_tokens} with prompts)")

    def fresh():
        return [Episode.from_dict(ep.to_dict()) for ep in episodes]

    def timed(score) -> tuple[float, list]:
        best, scored = float("inf"), None
        for i in range(args.repeats + 1):
            copy = fresh()
            start = time.perf_counter()
            score(copy)
            elapsed = time.perf_counter() - start
            if i and elapsed < best:        # the first run warms up
                best, scored = elapsed, copy
        return best, scored

    teacher, _ = load_model(args.teacher)
    torch_s, reference = timed(lambda eps: score_episodes(teacher, eps, pad_id=tokenizer.pad_token_id or 0))
    rows = [{"teacher": f"torch fp32 ({args.teacher})", "seconds": torch_s,
             "response_tokens_per_s": response_tokens / torch_s}]
    print(f"{rows[0]['teacher']:32s} {torch_s:7.3f} s  {response_tokens / torch_s:8.0f} response tok/s")

    ref = [lp for ep in reference for t in ep.turns for lp in (t.teacher_logprobs or [])]
    with tempfile.TemporaryDirectory() as tmp:
        f32 = write_gguf(resolve_model(args.teacher), Path(tmp) / "teacher.f32.gguf", "f32")
        for quant in args.quants.split(","):
            path = f32 if quant == "f32" else quantize_gguf(f32, Path(tmp) / f"teacher.{quant}.gguf", quant)
            gguf_teacher = LlamaCppTeacher.load(path, student_tokenizer=tokenizer, n_threads=args.threads)
            seconds, scored = timed(gguf_teacher.score_episodes)
            stats = gguf_teacher.stats
            gguf_teacher.close()
            got = [lp for ep in scored for t in ep.turns for lp in (t.teacher_logprobs or [])]
            row = {"teacher": f"llama.cpp {quant}", "seconds": seconds,
                   "response_tokens_per_s": response_tokens / seconds,
                   "speedup_vs_torch": torch_s / seconds,
                   "reused_share": stats["reused"] / max(1, stats["reused"] + stats["evaluated"]),
                   "max_abs_lp_diff": max(abs(a - b) for a, b in zip(ref, got))}
            rows.append(row)
            print(f"{row['teacher']:32s} {seconds:7.3f} s  {row['response_tokens_per_s']:8.0f} response tok/s  "
                  f"x{row['speedup_vs_torch']:.2f} vs torch  reused {row['reused_share']:.0%} of context tokens  "
                  f"max |dlp| {row['max_abs_lp_diff']:.1e}")
    if args.out:
        result = {"command": "python benchmarks/bench_gguf_teacher.py " + " ".join(
                      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
                  "episodes": len(episodes), "turns": len(turns), "response_tokens": response_tokens,
                  "tokens_with_prompts": all_tokens, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
