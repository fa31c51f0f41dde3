"""Step throughput of every registered built-in environment, on one core.

    python benchmarks/bench_envs.py [--seconds 2]

For each env in atod_edge.envs.list_envs() it plays eval tasks for about `--seconds` with a
random-admissible policy and then with the scripted expert, and prints steps/s (each policy's
time includes its resets). An env whose module does not import yet is skipped with a note.
"""

from __future__ import annotations

import argparse
import random
import time

from atod_edge.envs import list_envs, make_env
from atod_edge.errors import UserError


def measure(env, policy: str, seconds: float, n_tasks: int = 200) -> tuple[float, float, float]:
    """Play episodes for `seconds`; return (steps/s, episodes/s, win rate)."""
    tasks = env.tasks("eval", n_tasks)
    rng = random.Random(0)
    steps = episodes = wins = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.reset(tasks[episodes % n_tasks])
        for _ in range(env.max_turns):
            action = rng.choice(env.admissible_actions()) if policy == "random" else env.expert_action()
            result = env.step(action)
            steps += 1
            if result.done:
                break
        episodes += 1
        wins += bool(result.info.get("won"))
    elapsed = time.perf_counter() - start
    return steps / elapsed, episodes / elapsed, wins / episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per env and policy")
    parser.add_argument("--all", action="store_true", help="include the third-party engines (TextWorld, ALFWorld)")
    args = parser.parse_args()
    print(f"{'env':<18} {'policy':<8} {'steps/s':>10} {'episodes/s':>11} {'win rate':>9}")
    for name in list_envs(include_extras=args.all):
        try:
            env = make_env(name)
        except UserError as e:
            print(f"{name:<18} skipped: {e}")
            continue
        for policy in ("random", "expert"):
            steps_per_s, episodes_per_s, win_rate = measure(env, policy, args.seconds)
            print(f"{name:<18} {policy:<8} {steps_per_s:>10,.0f} {episodes_per_s:>11,.0f} {win_rate:>9.2f}")


if __name__ == "__main__":
    main()
