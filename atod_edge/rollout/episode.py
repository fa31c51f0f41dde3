"""Episode records: the interface between rollout, training, evaluation, export and the TUI.

One episode per JSONL line, with a schema version. Token-level fields are optional: the rollout
engine fills prompt/response ids and student log-probs, teacher scoring fills teacher log-probs,
the trainer fills T-DUR quantities. Each turn is one (prompt, response) pair: the prompt holds the
task, the last H turns and the current observation, so teacher and student score exactly the
recorded tokens of that turn.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from atod_edge.io import append_line, read_jsonl

# 1: the first schema; 2: Turn.finish_reason (schema-1 files read with finish_reason None)
SCHEMA_VERSION = 2
log = logging.getLogger(__name__)


@dataclass
class Turn:
    observation: str                 # what the agent saw before responding (env text)
    response: str = ""               # the agent's full response text (reasoning + action)
    action: str | None = None        # parsed action, None if the response could not be parsed
    valid: bool = True               # parsed and admissible in the environment
    reward: float = 0.0              # env reward for this step
    done: bool = False
    feedback: str = ""               # why an action was invalid, if it was
    admissible: list[str] | None = None
    expert_action: str | None = None  # the scripted expert's action in this state: the SFT label of
                                      # "dart" demos, whose executed action may be noise
    finish_reason: str | None = None  # how the response ended: "stop" (stop string or end-of-turn
                                      # token) or "length" (max_new_tokens reached: truncated);
                                      # None where not recorded (scripted turns, schema-1 files)
    # token-level fields (optional)
    prompt_ids: list[int] | None = None
    response_ids: list[int] | None = None
    student_logprobs: list[float] | None = None
    teacher_logprobs: list[float] | None = None
    disagreement: float | None = None   # T-DUR d_k
    uncertainty: float | None = None    # T-DUR h_k
    weight: float | None = None         # T-DUR w_k

    @property
    def truncated(self) -> bool:
        """The response was cut at max_new_tokens (finish_reason "length")."""
        return self.finish_reason == "length"


@dataclass
class Episode:
    env: str
    task_id: str
    seed: int
    split: str
    turns: list[Turn] = field(default_factory=list)
    reward: float = 0.0              # final (episode) reward from the env
    score: float = 0.0               # task score in [0, 1]
    success: bool = False
    final_observation: str = ""
    policy: str = ""                 # who acted: "expert", "random", a model path...
    step: int | None = None          # training step that produced it, if any
    group: int | None = None         # index of its GRPO group, if any
    meta: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def num_invalid(self) -> int:
        return sum(1 for t in self.turns if not t.valid)

    @property
    def num_truncated(self) -> int:
        return sum(1 for t in self.turns if t.truncated)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_turns"] = self.num_turns
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Episode":
        """Tolerant of older/newer schema versions: unknown keys are dropped, missing get defaults."""
        turn_names = {f.name for f in dataclasses.fields(Turn)}
        ep_names = {f.name for f in dataclasses.fields(cls)}
        raw_turns = d.get("turns") or []
        if not isinstance(raw_turns, list):
            raise ValueError(f"turns: expected a list, got {type(raw_turns).__name__}")
        turns = [Turn(**{k: v for k, v in t.items() if k in turn_names})
                 for t in raw_turns if isinstance(t, dict) and "observation" in t]
        # a null field gets its default (e.g. meta: null -> {}), so readers need no None checks
        kwargs = {k: v for k, v in d.items() if k in ep_names and k != "turns" and v is not None}
        for required in ("env", "task_id", "seed", "split"):
            kwargs.setdefault(required, "" if required != "seed" else -1)
        return cls(turns=turns, **kwargs)


def write_episodes(path: str | os.PathLike, episodes: Iterable[Episode]) -> int:
    """Append episodes to a JSONL file, one atomic line each. Returns how many were written."""
    n = 0
    for ep in episodes:
        append_line(path, json.dumps(ep.to_dict(), separators=(",", ":")))
        n += 1
    return n


def read_episodes(path: str | os.PathLike) -> tuple[list[Episode], int]:
    """Read episodes; torn or corrupt lines are skipped with a warning. Returns (episodes, skipped)."""
    records, skipped = read_jsonl(path)
    episodes = []
    for r in records:
        try:
            episodes.append(Episode.from_dict(r))
        except (TypeError, ValueError):
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d torn or corrupt line(s)", path, skipped)
    return episodes, skipped
