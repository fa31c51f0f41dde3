"""The environment protocol every env follows (built-in, third-party adapters, plug-ins).

    env = SomeEnv()
    obs = env.reset(Task(env="household", split="eval", index=3))
    result = env.step("open fridge 1")      # -> StepResult(observation, reward, done, info)
    env.admissible_actions()               # actions valid now
    env.expert_action()                    # the scripted expert's next action

An invalid or unparseable action is a step: it returns helpful feedback in the observation,
info["valid"] = False, and never raises. Rewards are sparse (given when done); info carries
"won" (bool) and "score" (float in [0, 1]).

Lifetime (both optional; an env that holds nothing needs neither):

    env.close()        # the engine is done with this instance: release what it holds (a process,
                       # a socket, a file). Called once, when its episode ends, also when the
                       # episode ends by an error or the run is interrupted (Ctrl-C).
    reusable = True    # class attribute: one instance may play episode after episode (each one
                       # starts with reset(task)); the rollout engine then keeps finished
                       # instances in an EnvPool and hands them to later episodes instead of
                       # making new ones, so a B x G step keeps at most B x G alive, across
                       # steps. They are closed when the pool is (at exit for the default pool).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: train: what training and SFT demos draw from; valid: the same distribution on disjoint seeds, kept
#: for choosing settings (never trained on, never reported in the tables); eval: the same distribution,
#: what the tables report; unseen: held-out kinds (each env says which)
SPLITS = ("train", "valid", "eval", "unseen")
#: longest action text an env parses (and the prompt parser accepts); longer inputs are rejected
#: before any parsing work, so junk input stays cheap
MAX_ACTION_CHARS = 200
#: past turns (action, observation) the agent's prompt shows by default (the default of every
#: `history_turns` option, prompts.build_messages). Declared here, below the prompt, because an
#: env's expert that acts only on what the prompt shows reads exactly this many (household).
HISTORY_TURNS = 2


@dataclass(frozen=True)
class Task:
    env: str
    split: str
    index: int

    @property
    def seed(self) -> int:
        """Deterministic seed, disjoint across splits (the split name is hashed in)."""
        h = hashlib.sha256(f"{self.env}/{self.split}/{self.index}".encode()).digest()
        return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF

    @property
    def task_id(self) -> str:
        return f"{self.env}/{self.split}/{self.index}"


@dataclass
class StepResult:
    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)  # valid, won, score, admissible, feedback


class Env:
    """Base class for environments. Subclasses set `name`, `max_turns` and implement the methods."""

    name: ClassVar[str] = "env"
    max_turns: ClassVar[int] = 30
    description: ClassVar[str] = ""
    #: instructions shown to the agent in the system prompt (action syntax, goal)
    instructions: ClassVar[str] = ""
    #: True: an instance can be reset() for a new episode after one ends (the engine reuses it)
    reusable: ClassVar[bool] = False

    def reset(self, task: Task) -> str:
        raise NotImplementedError

    def step(self, action: str) -> StepResult:
        raise NotImplementedError

    def admissible_actions(self) -> list[str]:
        raise NotImplementedError

    def expert_action(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release what this instance holds (processes, files). Optional: does nothing here."""

    def tasks(self, split: str, n: int, start: int = 0) -> list[Task]:
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}' (allowed: {', '.join(SPLITS)})")
        return [Task(self.name, split, i) for i in range(start, start + n)]


REQUIRED_METHODS = ("reset", "step", "admissible_actions", "expert_action", "tasks")
