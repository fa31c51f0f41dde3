"""Data for the TUI tests: episodes with every token-level field (and some without), copies of a
run directory the real trainer wrote, a byte-level BPE tokenizer, a tiny env that follows the protocol."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

from atod_edge.envs.base import Env, StepResult, Task
from atod_edge.rollout.episode import Episode, Turn, write_episodes

CORPUS = [
    "You are in the kitchen. You see a fridge 1, a counter 1 and a cabinet 2.",
    "Think: the apple is probably in the fridge. Action: open fridge 1",
    "Think: I should take the apple. Action: take apple 1 from fridge 1",
    "Think: now go to the counter. Action: go to counter 1",
    "Think: put it down. Action: put apple 1 in/on counter 1",
    "You search for a red mug under 20 dollars. Action: search red mug",
    "Think: the second result matches. Action: click item 2",
    "Action: buy now",
]


def build_tokenizer(path: Path):
    """Train a small byte-level BPE tokenizer (deterministic) and save it as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


HOUSEHOLD_TURNS = [
    ("You are in the kitchen. You see a fridge 1, a counter 1 and a cabinet 2.",
     "Think: the apple is probably in the fridge. Action: open fridge 1", "open fridge 1", True),
    ("You open the fridge 1. In it you see an apple 1.",
     "Think: I should take the apple. Action: take apple 1 from fridge 1", "take apple 1 from fridge 1", True),
    ("You take the apple 1 from the fridge 1.",
     "Think: now go to the counter. Action: go to the counter", "go to the counter", False),
    ("Nothing happens. Valid: go to counter 1.",
     "Think: now go to the counter. Action: go to counter 1", "go to counter 1", True),
    ("You arrive at counter 1.",
     "Think: put it down. Action: put apple 1 in/on counter 1", "put apple 1 in/on counter 1", True),
]
SHOP_TURNS = [
    ("Find a red mug under 20 dollars.", "Action: search red mug", "search red mug", True),
    ("[1] blue mug $12 [2] red mug $15 [3] red cup $30",
     "Think: the second result matches. Action: click item 2", "click item 2", True),
    ("red mug $15. [buy now]", "Action: buy now", "buy now", True),
]


def make_episodes(tokenizer=None, n: int = 8, seed: int = 0) -> list[Episode]:
    """Episodes alternating household/shop; odd ones are eval episodes without a teacher."""
    rng = random.Random(seed)
    episodes = []
    for i in range(n):
        env = "household" if i % 2 == 0 else "shop"
        script = HOUSEHOLD_TURNS if env == "household" else SHOP_TURNS
        with_teacher = i % 4 != 3
        success = i % 3 != 2
        turns = []
        for k, (obs, response, action, valid) in enumerate(script):
            ids = tokenizer.encode(response).ids if tokenizer is not None else list(range(10 + k, 20 + k))
            student = [round(-abs(rng.gauss(0.4, 0.5)), 4) for _ in ids]
            teacher = [round(s + rng.gauss(0.0, 1.2), 4) for s in student] if with_teacher else None
            d = round(sum(abs(a - b) for a, b in zip(teacher, student)) / len(ids), 4) if teacher else None
            h = round(-sum(student) / len(ids), 4)
            w = round(1 / (1 + math.exp(-(d - 0.8))), 4) if d is not None else None
            last = k == len(script) - 1
            turns.append(Turn(observation=obs, response=response, action=action, valid=valid,
                              reward=1.0 if (last and success) else 0.0, done=last,
                              feedback="" if valid else "not an admissible action",
                              admissible=[action, "look", "inventory"], prompt_ids=[1, 2, 3],
                              response_ids=ids, student_logprobs=student, teacher_logprobs=teacher,
                              disagreement=d, uncertainty=h, weight=w))
        episodes.append(Episode(env=env, task_id=f"{env}/{'train' if with_teacher else 'eval'}/{i}",
                                seed=1000 + i, split="train" if with_teacher else "eval", turns=turns,
                                reward=1.0 if success else 0.0, score=1.0 if success else 0.3,
                                success=success, final_observation="done", policy="student",
                                step=10 * (1 + i // 4) if with_teacher else None, group=i // 2))
    return episodes


def write_episodes_file(path: Path, episodes: list[Episode], *, corrupt: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_episodes(path, episodes)
    if corrupt:  # a corrupt middle line and a torn last line, as after a crash
        with open(path, "a", encoding="utf-8") as f:
            f.write("this is not json\n")
            f.write('{"env": "household", "task_id": "household/train/99", "tur')
    return path


def copy_run_dir(trained_run: Path, root: Path, *, corrupt: bool = True, finished: bool = False,
                 wall_clock: bool = True) -> Path:
    """A copy of a run directory written by train() (tests/conftest.py's trained_run), optionally
    with what a crash or a live run leaves: a corrupt line and a torn last line the trainer is
    still writing. wall_clock=False drops the time_* keys, for pictures that must not change."""
    shutil.copytree(trained_run, root)
    metrics = root / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    if not wall_clock:
        rows = [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")} for line in lines]
        lines = [json.dumps(r) for r in rows]
    if corrupt:
        lines.insert(3, "{not json")
    text = "\n".join(lines) + "\n"
    if corrupt:
        text += '{"step": %d, "success": 0.' % (last_step(root) + 1)   # a line still being written
    metrics.write_text(text)
    if finished:
        (root / "report.json").write_text(json.dumps({"final_success": 0.0}))
    return root


def last_step(run_dir: Path) -> int:
    return max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.startswith('{"') and line.endswith("}"))


async def until(pilot, condition, what: str = "", timeout: float = 30.0) -> None:
    """Let the app run (pilot.pause: its messages, timers and workers) until condition() holds,
    instead of sleeping a guessed time; a generous wall-clock limit turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        await pilot.pause(0.01)


class CountingEnv(Env):
    """Reach the target number with inc/dec. Tiny, deterministic, follows atod_edge/envs/base.py."""

    name = "counting"
    max_turns = 8
    instructions = "Reach the target number. Actions: inc, dec, look."

    def reset(self, task: Task) -> str:
        self.position = 0
        self.target = 2 + task.index % 3
        return f"You are at {self.position}. Reach {self.target}."

    def step(self, action: str) -> StepResult:
        action = action.strip()
        if action not in self.admissible_actions():
            return StepResult(f"'{action}' is not valid here. Try: inc, dec, look.", 0.0, False,
                              {"valid": False, "won": False, "score": 0.0,
                               "feedback": "not an admissible action"})
        if action == "inc":
            self.position += 1
        elif action == "dec":
            self.position -= 1
        won = self.position == self.target
        return StepResult(f"You are at {self.position}." + (" You reached the target!" if won else ""),
                          1.0 if won else 0.0, won, {"valid": True, "won": won, "score": 1.0 if won else 0.0})

    def admissible_actions(self) -> list[str]:
        return ["inc", "dec", "look"]

    def expert_action(self) -> str:
        return "inc" if self.position < self.target else "dec"


class BrokenEnv(CountingEnv):
    """Raises from step: the live screen must show a notice, not crash."""

    name = "broken"

    def step(self, action: str) -> StepResult:
        raise RuntimeError("the env fell over")


class GarbageEnv(CountingEnv):
    """step() returns a tuple instead of a StepResult: the episode ends with the protocol's one line."""

    name = "garbage"

    def step(self, action: str):
        return ("obs", 1.0, True, {})


class HangingEnv(CountingEnv):
    """step() hangs: the live session's deadline ends the episode."""

    name = "hanging"

    def step(self, action: str) -> StepResult:
        time.sleep(3600)


class BrokenExpertEnv(CountingEnv):
    """The scripted expert raises: the expert's turn ends the episode."""

    name = "broken-expert"

    def expert_action(self) -> str:
        raise KeyError("no plan")


#: the live screen's misbehaving envs by registered name (tests/tui/conftest.py: test_envs)
BAD_ENVS = {"broken": BrokenEnv, "garbage": GarbageEnv, "hanging": HangingEnv, "broken-expert": BrokenExpertEnv}


def env_spec(cls: type) -> str:
    """The plug-in import path of a test env class, however pytest imported this module."""
    return f"{cls.__module__}:{cls.__name__}"


def save_inspector_screenshot(out: Path, size: tuple[int, int] = (120, 36)) -> Path:
    """Write the README's SVG screenshot of the inspector, from this module's fixed data."""
    import asyncio
    import tempfile

    from atod_edge.tui.app import AtodApp

    async def shoot(tmp: Path) -> None:
        tok = build_tokenizer(tmp / "tok" / "tokenizer.json")
        episodes = write_episodes_file(tmp / "samples.jsonl", make_episodes(tok))
        app = AtodApp(str(episodes), tokenizer=str(tmp / "tok"))
        async with app.run_test(size=size) as pilot:
            await pilot.press("n", "n", "right_square_bracket", "t", *["right"] * 9)
            await pilot.pause()
            app.save_screenshot(out.name, path=str(out.parent))

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(shoot(Path(tmp)))
    return out


if __name__ == "__main__":   # python tests/tui/tui_fixtures.py docs/tui-inspector.svg
    import sys

    print(save_inspector_screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/tui-inspector.svg")))
