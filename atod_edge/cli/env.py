"""`atod-edge env list` and `atod-edge env play ENV`: the registered environments, and one played
by hand in the terminal (type an admissible action, `expert` for the scripted expert's, `quit`)."""

from __future__ import annotations

import argparse

from atod_edge.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("env", help="list environments, play one yourself")
    env_sub = p.add_subparsers(dest="env_command", metavar="ACTION")
    env_sub.add_parser("list", help="list environments")
    play = env_sub.add_parser("play", help="play an environment in the terminal")
    play.add_argument("env")
    play.add_argument("--seed", type=int, default=0, help="task index")
    play.add_argument("--split", default="eval", choices=["train", "valid", "eval", "unseen"])


def run(args: argparse.Namespace) -> int:
    from atod_edge.envs import env_class

    if args.env_command in (None, "list"):
        return _list()
    return _play(env_class(args.env)(), args.split, args.seed)


def _list() -> int:
    from atod_edge.envs import env_class, list_envs

    for name in list_envs():
        try:
            cls = env_class(name)
        except UserError:
            print(f"{name:18s} (optional: pip install 'atod-edge[envs]', or [alfworld] for alfworld-engine)")
            continue
        print(f"{name:18s} max {cls.max_turns:2d} turns  {cls.description}")
    return 0


def _play(env, split: str, index: int) -> int:
    task = env.tasks(split, 1, start=index)[0]
    print(env.reset(task))
    turns = 0
    while True:
        print("\nadmissible:", " | ".join(env.admissible_actions()[:30]))
        try:
            action = input("> ").strip()
        except EOFError:
            print()
            return 0
        if action in ("quit", "exit"):
            return 0
        if action == "expert":
            action = env.expert_action()
            print(f"(expert) {action}")
        result = env.step(action)
        turns += 1
        print(result.observation)
        if result.done:
            won = result.info.get("won", False)
            print(f"\n{'won' if won else 'done'} after {turns} turns, score {result.info.get('score', result.reward)}")
            return 0
