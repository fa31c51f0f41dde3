"""What an agent's failed household episodes look like: how far each got, by task family.

    python benchmarks/episode_failures.py EVAL_DIR/episodes.jsonl [MORE.jsonl ...] [--md OUT.md]

For each file (an `atod-edge eval` or `models publish --save-episodes` output), success by task
family (look, place, two, clean, heat, cool), and every failed episode put in the first stage it
never passed: the goal object never seen (no observation names its kind), seen but never taken,
taken but the task not finished. Also the invalid actions (unparseable replies vs. actions that
are not admissible there) and loops (the same action three turns running, or two alternating).
The goal is read by the env's own parser (envs.household.experts.parse_goal).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

from atod_edge.envs.household.experts import parse_goal
from atod_edge.rollout.episode import read_episodes

STAGES = ("never saw the goal object", "saw it, never took it", "took it, did not finish")


def stage(episode, kind: str) -> str:
    """The first stage a failed episode never passed."""
    seen = re.compile(rf"\b{re.escape(kind)} \d+\b")
    observations = [t.observation for t in episode.turns] + [episode.final_observation or ""]
    if not any(seen.search(text or "") for text in observations):
        return STAGES[0]
    took = any(t.valid and (t.action or "").startswith(f"take {kind} ") for t in episode.turns)
    return STAGES[2] if took else STAGES[1]


def looped(episode) -> bool:
    actions = [t.action for t in episode.turns]
    for i in range(2, len(actions)):
        if actions[i] is not None and actions[i] == actions[i - 1] == actions[i - 2]:
            return True
        if i >= 3 and actions[i] is not None and actions[i] == actions[i - 2] and actions[i - 1] == actions[i - 3] \
                and actions[i] != actions[i - 1]:
            return True
    return False


def analyse(path: Path) -> dict:
    episodes, _ = read_episodes(path)
    by_family: dict[str, list[int]] = {}
    stages: Counter = Counter()
    turns = invalid = unparsed = loops = 0
    for ep in episodes:
        task = ep.turns[0].observation if ep.turns else ""
        goal = parse_goal(task)
        by_family.setdefault(goal.family, []).append(int(bool(ep.success)))
        turns += len(ep.turns)
        invalid += sum(not t.valid for t in ep.turns)
        unparsed += sum(t.action is None for t in ep.turns)
        if not ep.success:
            stages[stage(ep, goal.obj)] += 1
            loops += looped(ep)
    failed = sum(not ep.success for ep in episodes)
    return {"episodes": len(episodes), "success": sum(ep.success for ep in episodes) / max(1, len(episodes)),
            "failed": failed, "families": {f: (sum(v), len(v)) for f, v in sorted(by_family.items())},
            "stages": {s: stages[s] for s in STAGES}, "loops": loops,
            "invalid_rate": invalid / max(1, turns), "unparsed_rate": unparsed / max(1, turns)}


def markdown(results: dict[str, dict]) -> str:
    lines = []
    for name, r in results.items():
        lines += [f"### {name}: {r['success']:.1%} of {r['episodes']} episodes", "",
                  "| task family | won / played |", "|---|---|"]
        lines += [f"| {f} | {won} / {n} ({won / n:.0%}) |" for f, (won, n) in r["families"].items()]
        lines += ["", f"Failed episodes ({r['failed']}), by the first stage they never passed:", ""]
        lines += [f"- {s}: {k} ({k / max(1, r['failed']):.0%})" for s, k in r["stages"].items()]
        lines += [f"- in a loop at some point (one action three turns running, or two alternating): {r['loops']} "
                  f"({r['loops'] / max(1, r['failed']):.0%})",
                  f"- invalid actions: {r['invalid_rate']:.1%} of all turns ({r['unparsed_rate']:.1%} not parseable "
                  f"as an action, the rest not admissible there)", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("episodes", nargs="+", type=Path)
    parser.add_argument("--md", type=Path, help="also write the report here")
    args = parser.parse_args()
    results = {str(p): analyse(p) for p in args.episodes}
    text = markdown(results)
    print(text)
    if args.md:
        from atod_edge.io import atomic_write_text

        atomic_write_text(args.md, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
