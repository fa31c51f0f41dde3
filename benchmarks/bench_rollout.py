"""Rollout throughput: the batched engine vs a naive loop that calls HF `generate` once per
episode per turn. Same model, same tasks, same sampling settings, measured in one run.

    python benchmarks/bench_rollout.py [--model tiny-student] [--episodes 64] [--max-turns 8]

Prints episodes/s and generated tokens/s of each and the ratios, and writes them to
benchmarks/results/rollout.json (top-level "speedup": episodes/s, engine / naive), with the
machine and the command. The engine runs twice: with
prefix reuse (the default: each prompt's KV up to its longest block-aligned prefix seen earlier in
the batch of episodes is reused, see atod_edge/kv_cache.py) and without, to show what that
reuse is worth. The share of prompt tokens reused is printed: an untrained model repeats invalid
actions, so its prompts change less from turn to turn than a trained agent's (pass a trained
checkpoint dir as --model to measure that case).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "rollout.json"


def naive_rollouts(model, tokenizer, env_cls, tasks, max_turns: int, max_new_tokens: int) -> tuple[int, int]:
    """One episode at a time, one `generate` call per turn. Returns (episodes, generated tokens)."""
    import torch

    from atod_edge.prompts import build_messages, encode_prompt, parse_action

    tokens = 0
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for task in tasks:
        env = env_cls()
        task_obs = obs = env.reset(task)
        history: list[tuple[str, str]] = []
        for _turn in range(max_turns):
            messages = build_messages(env_cls.instructions, task_obs, history, obs if history else None,
                                      env.admissible_actions())
            ids = torch.tensor([encode_prompt(tokenizer, messages)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos,
                                 stop_strings=["</action>"], tokenizer=tokenizer)
            new = out[0, ids.shape[1]:]
            tokens += len(new)
            action = parse_action(tokenizer.decode(new, skip_special_tokens=True)).action or ""
            result = env.step(action)
            history.append((action or "(invalid)", result.observation))
            obs = result.observation
            if result.done:
                break
    return len(tasks), tokens


def main() -> None:
    import torch

    from atod_edge.envs import env_class
    from atod_edge.models.loading import load_model
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.rollout.runner import run_episodes

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-student")
    parser.add_argument("--env", default="household")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--naive-episodes", type=int, default=16, help="the naive loop is slow: time fewer")
    parser.add_argument("--max-turns", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--note", default="", help="a remark stored in the JSON (e.g. the machine's load)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    model.eval()
    env_cls = env_class(args.env)
    tasks = env_cls().tasks("eval", args.episodes)
    print(f"model {args.model}, env {args.env}, torch threads {torch.get_num_threads()}")

    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
    rows, reuse = [], 0.0
    for label, megabytes in (("engine (batched, KV cache, prefix reuse)", 256),
                             ("engine without prefix reuse", 0)):
        policy = TorchPolicy(model, tokenizer, prefix_cache_mb=megabytes)
        t0 = time.perf_counter()
        episodes = run_episodes(policy, env_cls, tasks, sampling=sampling, max_turns=args.max_turns)
        seconds = time.perf_counter() - t0
        rows.append((label, len(episodes), seconds, sum(len(t.response_ids) for ep in episodes for t in ep.turns)))
        if policy.last_store is not None:
            reuse = policy.last_store.hit_rate

    t0 = time.perf_counter()
    with torch.inference_mode():
        n_naive, naive_tokens = naive_rollouts(model, tokenizer, env_cls, tasks[:args.naive_episodes],
                                               args.max_turns, args.max_new_tokens)
    naive_s = time.perf_counter() - t0
    rows.append(("naive (generate per episode per turn)", n_naive, naive_s, naive_tokens))

    print(f"{'':42s} {'episodes':>8s} {'seconds':>8s} {'episodes/s':>10s} {'tokens/s':>9s} {'vs naive':>8s}")
    naive_rate = n_naive / naive_s
    for name, n, s, tok in rows:
        print(f"{name:42s} {n:8d} {s:8.1f} {n / s:10.2f} {tok / s:9.0f} {n / s / naive_rate:7.1f}x")
    print(f"prompt tokens reused from the prefix store: {reuse:.0%}")
    (_, n, s, tok), naive = rows[0], rows[-1]
    print(f"ratio engine/naive: {(n / s) / naive_rate:.1f}x episodes/s, "
          f"{(tok / s) / (naive[3] / naive[2]):.1f}x tokens/s")
    result = {
        "speedup": (n / s) / naive_rate, "tokens_per_s_speedup": (tok / s) / (naive[3] / naive[2]),
        "command": "python " + " ".join(sys.argv), "note": args.note,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "settings": {"model": args.model, "env": args.env, "episodes": args.episodes,
                     "naive_episodes": args.naive_episodes, "max_turns": args.max_turns,
                     "max_new_tokens": args.max_new_tokens},
        "prefix_reuse_share": reuse,
        "rows": [{"name": name, "episodes": n_, "seconds": s_, "episodes_per_s": n_ / s_, "tokens_per_s": t_ / s_,
                  "vs_naive": n_ / s_ / naive_rate} for name, n_, s_, t_ in rows],
    }
    from atod_edge.io import atomic_write_text

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
