"""One live episode driven turn by turn, without any UI: an env, a task and an agent.

The live-run screen calls `decide()` and `apply()` from a worker thread, so this module is plain
blocking Python; it records every turn as an `atod_edge.rollout.episode.Turn`, so a live episode can be
saved and opened in the inspector like any other.

Env calls are guarded as the rollout engine guards them (atod_edge.rollout.env_calls): each
reset / step / admissible_actions / expert_action call has a deadline (`ENV_CALL_TIMEOUT`), and
an env that raises, hangs past it or returns the wrong type (envs.base's checks) ends the episode
with an `EnvCallError`, one line, kept in `LiveSession.error`; the screen shows it, never crashes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from atod_edge.envs import SPLITS, Task, make_env
from atod_edge.envs.base import (EnvProtocolError, checked_action, checked_actions, checked_observation,
                                 checked_step, env_label)
from atod_edge.rollout.env_calls import ENV_CALL_ERRORS, ENV_STEP_TIMEOUT, EnvTimeout, call_with_deadline
from atod_edge.rollout.episode import Episode, Turn
from atod_edge.errors import UserError

#: seconds one env call of a live session may take (the rollout engine's default); 0: no limit
ENV_CALL_TIMEOUT = ENV_STEP_TIMEOUT


class EnvCallError(UserError):
    """The env raised, hung past its deadline or returned the wrong type: the episode is over."""


class Agent(Protocol):
    name: str

    def respond(self, session: "LiveSession") -> tuple[str, str | None, str]:
        """Return (response text, parsed action or None, why it could not be parsed) for the
        session's current observation."""


class ExpertAgent:
    """The environment's scripted expert."""

    name = "expert"

    def respond(self, session: "LiveSession") -> tuple[str, str | None, str]:
        action = session.call_env("expert_action", what="expert failed")
        if action is not None:
            try:
                checked_action(session.env, action)
            except EnvProtocolError as e:
                raise session.fail("expert failed", e) from None
        return f"<action>{action}</action>", action, ""


class HumanAgent:
    """A person types every action; `respond` is never asked for one."""

    name = "human"

    def respond(self, session: "LiveSession") -> tuple[str, str | None, str]:
        raise UserError("the human agent acts only by typing an action")


class ModelAgent:
    """A model (checkpoint directory, .onnx or .gguf) through the core policy interface.

    The policy is loaded on first use, inside the worker thread, so the UI stays responsive.
    """

    def __init__(self, path: str, device: str = "cpu", temperature: float = 0.0):
        self.path = path
        self.device = device
        # greedy by default: a live demo should be reproducible turn by turn
        self.temperature = temperature
        self.name = f"model:{Path(path).name}"
        self._policy = None

    def load(self):
        if self._policy is None:
            try:
                from atod_edge.engine.backends import load_policy
            except ImportError as e:
                raise UserError(f"model agents need atod_edge.engine, which is not available: {e}") from None
            self._policy = load_policy(self.path, device=self.device)
        return self._policy

    def respond(self, session: "LiveSession") -> tuple[str, str | None, str]:
        policy = self.load()
        try:
            from atod_edge.engine.sampling import SamplingParams
            from atod_edge.rollout.runner import act
        except ImportError as e:
            raise UserError(f"model agents need atod_edge.rollout, which is not available: {e}") from None
        instructions = getattr(session.env, "instructions", "")
        response, action, reason = act(policy, instructions, session.task_observation, session.history,
                                       session.observation, session.admissible,
                                       SamplingParams(temperature=self.temperature),
                                       seed=len(session.turns))
        return response, action, reason


def make_agent(kind: str, model_path: str | None = None) -> Agent:
    if kind == "expert":
        return ExpertAgent()
    if kind == "human":
        return HumanAgent()
    if kind == "model":
        if not model_path:
            raise UserError("choose a model path (a checkpoint directory, an .onnx or a .gguf file)")
        from atod_edge.tui.data import classify_path

        if classify_path(model_path) != "live":   # raises "path not found" early, before any import
            raise UserError(f"{model_path} is not a model (a checkpoint directory, an .onnx or a .gguf file)")
        return ModelAgent(model_path)
    raise UserError(f"unknown agent '{kind}' (allowed: expert, human, model)")


@dataclass
class StepOutcome:
    """What one turn did, for the screen to show."""

    turn: Turn
    observation: str
    done: bool
    won: bool
    score: float
    error: str = ""    # an env error after the step ended the episode (LiveSession.error)


class LiveSession:
    """An environment, one task and the turns taken so far."""

    def __init__(self, env_name: str, split: str = "eval", index: int = 0, timeout: float | None = None):
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}' (allowed: {', '.join(SPLITS)})")
        if index < 0:
            raise UserError(f"task index must be >= 0, got {index}")
        self.env_name = env_name
        self.env = make_env(env_name)
        self.task = Task(getattr(self.env, "name", env_name), split, index)
        self.turns: list[Turn] = []
        self.task_observation = ""       # the first observation: it states the task
        self.history: list[tuple[str, str]] = []   # (action, observation after), as rollout builds it
        self.observation = ""
        self.admissible: list[str] = []
        self.done = False
        self.won = False
        self.score = 0.0
        self.total_reward = 0.0
        self.timeout = ENV_CALL_TIMEOUT if timeout is None else timeout   # seconds an env call may take
        self.error = ""      # the env error that ended the episode, one line ("": none)
        self.hung = False    # an env call ran past the deadline (it may still be running)

    def close(self) -> None:
        """Done with this episode's env: call its optional close() (see atod_edge/envs/base.py).
        An env that hung is closed on a daemon thread, never waited for (its close() may hang too)."""
        from atod_edge.rollout.runner import close_env

        if self.hung:
            threading.Thread(target=close_env, args=(self.env,), name="atod-env-close", daemon=True).start()
        else:
            close_env(self.env)

    def call_env(self, method: str, *args, what: str = ""):
        """self.env.<method>(*args) within the deadline; an exception or a hang ends the episode
        (EnvCallError, `what` its prefix: "env <method> failed" unless given)."""
        try:
            return call_with_deadline(getattr(self.env, method), *args, timeout=self.timeout or None,
                                      what=f"env {env_label(self.env)}: {method}()")
        except ENV_CALL_ERRORS as e:
            raise self.fail(what or f"env {method} failed", e) from None

    def fail(self, what: str, error: BaseException) -> EnvCallError:
        """End the episode with an env error; returns the one-line EnvCallError to raise."""
        self.hung = self.hung or isinstance(error, EnvTimeout)
        text = str(error) if isinstance(error, EnvProtocolError) else f"{what}: {type(error).__name__}: {error}"
        self.error = " ".join(text.split())[:300]
        self.done, self.admissible = True, []
        return EnvCallError(self.error)

    def reset(self) -> str:
        self.turns, self.done, self.won, self.score, self.total_reward = [], False, False, 0.0, 0.0
        self.history, self.error = [], ""
        observation = self.call_env("reset", self.task)
        admissible = self.call_env("admissible_actions", what="env reset failed")
        try:
            self.observation = self.task_observation = checked_observation(self.env, observation, "reset()")
            self.admissible = checked_actions(self.env, admissible)
        except EnvProtocolError as e:
            raise self.fail("env reset failed", e) from None
        return self.observation

    @property
    def max_turns(self) -> int:
        return int(getattr(self.env, "max_turns", 30))

    def decide(self, agent: Agent) -> tuple[str, str | None, str]:
        return agent.respond(self)

    def apply(self, action: str | None, response: str | None = None, reason: str = "") -> StepOutcome:
        """Step the env with `action` and record the turn. None means the response could not be
        parsed (`reason` says why): like the rollout engine, the turn is spent on an empty action
        and the env's feedback explains what is valid."""
        if self.done:
            raise UserError("the episode is over: restart or go to the next task")
        observation_before, admissible_before = self.observation, list(self.admissible)
        raw = self.call_env("step", action or "")
        try:
            result = checked_step(self.env, raw)
        except EnvProtocolError as e:
            raise self.fail("env step failed", e) from None
        info = result.info
        valid = bool(info.get("valid", True)) and action is not None
        feedback = reason if action is None else ("" if valid else str(info.get("feedback", "") or ""))
        turn = Turn(observation=observation_before, response=response if response is not None else (action or ""),
                    action=action, valid=valid, reward=float(result.reward), done=bool(result.done),
                    feedback=feedback, admissible=admissible_before)
        self.turns.append(turn)
        self.history.append((action if action else "(invalid)", result.observation))
        self.observation = result.observation
        self.total_reward += float(result.reward)
        self.won = bool(info.get("won", self.won))
        self.score = float(info.get("score", self.score) or 0.0)
        self.done = bool(result.done) or len(self.turns) >= self.max_turns
        self.admissible = [] if self.done else self._admissible()
        return StepOutcome(turn, result.observation, self.done, self.won, self.score, self.error)

    def _admissible(self) -> list[str]:
        """The actions after a step, as the rollout engine takes them: an env that raises offers
        none; one that hangs or returns the wrong type ends the episode (self.error)."""
        try:
            value = call_with_deadline(self.env.admissible_actions, timeout=self.timeout or None,
                                       what=f"env {env_label(self.env)}: admissible_actions()")
            return checked_actions(self.env, value)
        except (EnvTimeout, EnvProtocolError) as e:
            self.fail("env admissible_actions failed", e)
        except Exception:   # noqa: BLE001 - the env's own error: no actions offered
            pass
        return []

    def episode(self, policy: str) -> Episode:
        return Episode(env=self.task.env, task_id=self.task.task_id, seed=self.task.seed,
                       split=self.task.split, turns=list(self.turns), reward=self.total_reward,
                       score=self.score, success=self.won, final_observation=self.observation,
                       policy=policy)
