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
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar

from atod_edge.errors import UserError

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


# --------------------------------------------------------------------------------------------
# What an env returns, checked where the engine receives it: a value of the wrong type is a bug in
# the env, refused with one line naming the env class, the method and the field (EnvProtocolError),
# instead of a traceback deep in the prompt builder or the trainer.


class EnvProtocolError(UserError):
    """An env returned something the protocol does not allow (one line: class, method, field)."""


def env_label(env: Any) -> str:
    """How messages name an env: its class as `module:Class` (the form --env takes)."""
    cls = env if isinstance(env, type) else type(env)
    return f"{cls.__module__}:{cls.__qualname__}"


def _bad(env: Any, where: str, what: str, value: Any, expected: str) -> EnvProtocolError:
    shown = " ".join(repr(value).split())
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    what = f"{what} " if what else ""
    return EnvProtocolError(f"env {env_label(env)}: {where} returned {what}{shown} "
                            f"({type(value).__name__}), expected {expected}")


def checked_observation(env: Any, value: Any, where: str = "reset()") -> str:
    """An observation must be text."""
    if not isinstance(value, str):
        raise _bad(env, where, "an observation", value, "a str")
    return value


def checked_action(env: Any, value: Any, where: str = "expert_action()") -> str:
    """An action must be text."""
    if not isinstance(value, str):
        raise _bad(env, where, "an action", value, "a str")
    return value


def checked_actions(env: Any, value: Any, where: str = "admissible_actions()") -> list[str]:
    """Admissible actions: a list (or tuple) of strings; None counts as none."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise _bad(env, where, "admissible actions", value, "a list of str")
    for action in value:
        if not isinstance(action, str):
            raise _bad(env, where, "an admissible action", action, "a str")
    return list(value)


def checked_step(env: Any, result: Any) -> StepResult:
    """A StepResult (or an object with its four fields) with a str observation, a finite real
    reward, a bool done and a dict info (None counts as {}); returned as a plain StepResult."""
    fields = ("observation", "reward", "done", "info")
    if isinstance(result, tuple) or not all(hasattr(result, f) for f in fields):
        raise _bad(env, "step()", "", result, "a StepResult(observation, reward, done, info)")
    observation = checked_observation(env, result.observation, "step()")
    reward = result.reward
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(float(reward)):
        raise _bad(env, "step()", "reward", reward, "a finite number")
    done = result.done
    if not (isinstance(done, bool) or type(done).__name__ == "bool_" or (isinstance(done, numbers.Integral)
                                                                        and int(done) in (0, 1))):
        raise _bad(env, "step()", "done", done, "a bool")
    info = {} if result.info is None else result.info
    if not isinstance(info, dict):
        raise _bad(env, "step()", "info", info, "a dict")
    if "admissible" in info:
        info = {**info, "admissible": checked_actions(env, info["admissible"], "step()")}
    score = info.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, numbers.Real)
                              or not math.isfinite(float(score))):
        raise _bad(env, "step()", "info['score']", score, "a finite number")
    return StepResult(observation, float(reward), bool(done), info)


def checked_tasks(env: Any, value: Any, n: int) -> list[Task]:
    """tasks(split, n): a list of Task, at least one when n > 0."""
    if not isinstance(value, (list, tuple)):
        raise _bad(env, "tasks()", "", value, "a list of Task")
    for task in value:
        if not isinstance(task, Task):
            raise _bad(env, "tasks()", "a task", task, "a Task(env, split, index)")
    if n > 0 and not value:
        raise EnvProtocolError(f"env {env_label(env)}: tasks() returned no tasks (asked for {n})")
    return list(value)
