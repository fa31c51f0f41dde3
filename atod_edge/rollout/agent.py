"""An embeddable agent: one episode at a time, on any backend, with the prompts it was trained on.

    from atod_edge import Agent

    agent = Agent.load("dist/agent.q4_k_m.gguf", env_instructions=env.instructions)
    agent.reset(first_observation)                   # the text that states the task
    result = agent.act(observation, admissible)      # -> AgentAction
    result.action                                    # "open fridge 1", or None when invalid
    result.reason                                    # why it is invalid ("" when valid)

`Agent.load` takes a checkpoint dir or model name (PyTorch), a `.onnx` file or ONNX export dir
(ONNX Runtime) or a `.gguf` file (llama.cpp). The agent keeps the last `history_turns` turns itself,
builds the prompt exactly as the rollout engine does in training and evaluation
(`atod_edge.prompts.build_messages`), and parses the reply with the same parser. `act` never
raises on what the model writes: garbage comes back as an invalid result with the reason. A prompt
longer than the model's context less `max_new_tokens` (or `max_prompt_tokens`) is cut as the rollout
engine cuts it (atod_edge.rollout.budget: oldest history first, then the observation and the task
text to their tails); `result.prompt_cut` says what was cut.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from atod_edge.errors import UserError
from atod_edge.engine.policy import Policy
from atod_edge.engine.sampling import SamplingParams
from atod_edge.prompts import parse_action
from atod_edge.rollout.budget import PromptFitter, prompt_budget

INVALID = "(invalid)"        # what the history shows for a turn without a usable action (as in training)


@dataclass(frozen=True)
class AgentAction:
    action: str | None       # the parsed action, None when the reply held none
    reason: str              # why there is no action ("" when there is one)
    response: str            # the model's whole reply
    seconds: float           # wall time of this act() call (prompt, generation, parsing)
    prompt_cut: str = ""     # what was cut so the prompt fits the model's context ("" when nothing)

    @property
    def valid(self) -> bool:
        return self.action is not None


class Agent:
    """A policy plus the episode state the prompt needs: the task text and the recent turns."""

    def __init__(self, policy: Policy, env_instructions: str = "", history_turns: int = 2,
                 temperature: float = 0.0, max_new_tokens: int = 48, seed: int = 0,
                 chat_template_kwargs: dict | None = None, max_prompt_tokens: int | None = None):
        self.policy = policy
        self.chat_template_kwargs = dict(chat_template_kwargs or {})   # as in training, e.g. Qwen3's enable_thinking
        self.instructions = env_instructions
        self.history_turns = history_turns
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
        self.seed = seed
        self._task: str | None = None
        self._history: deque[tuple[str, str]] = deque(maxlen=max(history_turns, 1))
        self._turn = 0
        self._last_action: str | None = None
        # prompts over the model's context less max_new_tokens (or max_prompt_tokens) are cut:
        # oldest history first, then the observation and task text to their tails (rollout.budget)
        self._fitter = PromptFitter(policy.tokenizer, env_instructions, history_turns,
                                    prompt_budget(policy, max_new_tokens, max_prompt_tokens),
                                    self.chat_template_kwargs)

    @classmethod
    def load(cls, path_or_name: str, env_instructions: str = "", history_turns: int = 2,
             temperature: float = 0.0, max_new_tokens: int = 48, seed: int = 0, device: str = "cpu",
             chat_template_kwargs: dict | None = None, max_prompt_tokens: int | None = None,
             **backend_options) -> "Agent":
        """Open a model with the backend of its kind (see the module docstring).
        temperature 0 (the default) is greedy: the same observations give the same actions.
        chat_template_kwargs: the chat template's extra variables the model was trained with."""
        from atod_edge.engine.backends import load_policy

        policy = load_policy(str(path_or_name), device=device, **backend_options)
        return cls(policy, env_instructions, history_turns, temperature, max_new_tokens, seed, chat_template_kwargs,
                   max_prompt_tokens)

    def reset(self, task_text: str) -> None:
        """Start an episode. `task_text` is its first observation (the one that states the task)."""
        if not isinstance(task_text, str):
            raise UserError(f"Agent.reset needs the task text, got {type(task_text).__name__}")
        self._task = task_text
        self._history.clear()
        self._turn = 0
        self._last_action = None

    def act(self, observation: str, admissible: Sequence[str] | None = None) -> AgentAction:
        """The next action for `observation` (on the first turn, the task text again or anything:
        the task text is what the prompt shows), given the actions admissible now."""
        started = time.perf_counter()
        if self._task is None:
            raise UserError("call Agent.reset(task_text) before act()")
        observation = observation if isinstance(observation, str) else str(observation)
        if self._turn > 0:
            # what the last action led to: the history the training prompts show
            self._history.append((self._last_action or INVALID, observation))
        parts = (self._task, list(self._history), None if self._turn == 0 else observation,
                 [str(a) for a in admissible or []])
        cut = ""
        try:
            prompt, cut = self._fitter.encode([parts])[0]
            generation = self.policy.generate([prompt], self.sampling, seed=self.seed * 1_000_003 + self._turn)[0]
            text = generation.text
        except UserError as e:       # e.g. a prompt longer than the runtime's context
            text, parsed = "", None
            reason = f"no reply: {e}"
        else:
            parsed = parse_action(text)
            reason = parsed.reason
        self._turn += 1
        self._last_action = parsed.action if parsed else None
        return AgentAction(self._last_action, "" if self._last_action else reason, text,
                           time.perf_counter() - started, cut)

    @property
    def turns(self) -> int:
        """Turns taken since the last reset."""
        return self._turn

    def close(self) -> None:
        self.policy.close()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
