"""How often a model picks the expert's action on the expert's own path (a diagnostic for SFT).

    python benchmarks/turn_accuracy.py MODEL [MODEL ...] [--env household] [--episodes 30]

Plays `--episodes` eval-split tasks with the scripted expert, then asks each model for its
greedy action at every turn of those episodes (the prompt the agent would see there, built by the
same code as the rollout engine) and prints the share of turns where it matches the expert, by the
action's first word. Episode success compounds these per-turn choices (eight turns at 90% each
leave 43%), and a model that is never off the expert's path here can still fail once it is.
"""

from __future__ import annotations

import argparse
from collections import Counter

from atod_edge.envs import env_class
from atod_edge.engine.backends import load_policy
from atod_edge.engine.sampling import SamplingParams
from atod_edge.prompts import encode_prompt, parse_action
from atod_edge.rollout.runner import episode_messages, run_scripted


def turn_accuracy(model: str, env: str, episodes: int, batch: int = 32) -> tuple[float, dict[str, tuple[float, int]]]:
    """(overall accuracy, {first word of the expert action: (accuracy, turns)})."""
    cls = env_class(env)
    demos = run_scripted("expert", cls, cls().tasks("eval", episodes))
    policy = load_policy(model)
    prompts, gold = [], []
    for ep in demos:
        for k, turn in enumerate(ep.turns):
            prompts.append(encode_prompt(policy.tokenizer, episode_messages(ep, k, cls.instructions)))
            gold.append(turn.action)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=32)
    answers = [g.text for i in range(0, len(prompts), batch) for g in policy.generate(prompts[i:i + batch], greedy)]
    right, seen = Counter(), Counter()
    for text, action in zip(answers, gold):
        verb = action.split()[0]
        seen[verb] += 1
        right[verb] += parse_action(text).action == action
    by_verb = {verb: (right[verb] / seen[verb], seen[verb]) for verb in sorted(seen, key=seen.get, reverse=True)}
    return sum(right.values()) / max(len(gold), 1), by_verb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="checkpoint dirs or presets")
    parser.add_argument("--env", default="household")
    parser.add_argument("--episodes", type=int, default=30)
    args = parser.parse_args()
    for model in args.models:
        overall, by_verb = turn_accuracy(model, args.env, args.episodes)
        turns = sum(n for _, n in by_verb.values())
        detail = ", ".join(f"{verb} {acc:.0%} of {n}" for verb, (acc, n) in by_verb.items())
        print(f"{model}: {overall:.1%} of {turns} on-path turns ({detail})")


if __name__ == "__main__":
    main()
