"""What the inspector reads, without any UI: episode files, their repair, filters and summary numbers.

Data flow: rollouts write episodes JSONL (rollout/episode.py: evaluation output, training
samples, saved live runs) -> `load_episodes` reads and repairs them -> EpisodeFilter picks what
the inspector lists, `episode_stats` sums one up (the diff screen reads pairs of files through
diff_data.py, which uses `load_episodes` too).

Everything here tolerates files that are torn, corrupt, from an older schema or still being
written: a problem becomes a count or a notice string, never an exception the UI has to catch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atod_edge.errors import UserError
from atod_edge.rollout.episode import SCHEMA_VERSION, Episode, read_episodes


# ---------------------------------------------------------------------------- episode files


def load_episodes(path: str | Path) -> tuple[list[Episode], str | None]:
    """Read an episodes file; returns (episodes, notice) where notice describes any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"episodes file not found: {path}")
    try:
        episodes, skipped = read_episodes(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    notices = []
    if skipped:
        notices.append(f"skipped {skipped} torn or corrupt line(s)")
    repaired = 0
    for i, ep in enumerate(episodes):
        episodes[i], changed = clean_episode(ep)
        repaired += changed
    if repaired:
        notices.append(f"{repaired} episode(s) had fields of the wrong type (shown blank)")
    newer = sum(1 for ep in episodes if isinstance(ep.schema_version, int)
                and ep.schema_version > SCHEMA_VERSION)
    if newer:
        notices.append(f"{newer} episode(s) use a newer schema than this reader (v{SCHEMA_VERSION}); "
                       "unknown fields are ignored")
    if not episodes and not skipped:
        notices.append("the file holds no episodes")
    return episodes, ("; ".join(notices) or None)


def _number(value: Any, default: float | None) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return value


def _int(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _numbers(values: Any, kind: type) -> list | None:
    if not isinstance(values, list):
        return None
    if kind is int:
        return values if all(isinstance(v, int) and not isinstance(v, bool) for v in values) else None
    return [_number(v, None) for v in values]


def clean_episode(ep: Episode) -> tuple[Episode, bool]:
    """Coerce every field the screens read to its declared type (a file written by other tools
    or a damaged one can hold anything). Returns (episode, whether anything had to change)."""
    before = repr(ep)
    ep.env, ep.task_id, ep.split = _text(ep.env), _text(ep.task_id), _text(ep.split)
    ep.policy, ep.final_observation = _text(ep.policy), _text(ep.final_observation)
    ep.seed = _int(ep.seed, -1)
    ep.step, ep.group = _int(ep.step, None), _int(ep.group, None)
    ep.reward, ep.score = _number(ep.reward, 0.0), _number(ep.score, 0.0)
    ep.success = ep.success if isinstance(ep.success, bool) else False
    ep.schema_version = _int(ep.schema_version, 0)
    if not isinstance(ep.meta, dict):
        ep.meta = {}
    for t in ep.turns:
        t.observation, t.response, t.feedback = _text(t.observation), _text(t.response), _text(t.feedback)
        t.action = None if t.action is None else _text(t.action)
        t.valid = t.valid if isinstance(t.valid, bool) else False
        t.done = t.done if isinstance(t.done, bool) else False
        t.reward = _number(t.reward, 0.0)
        if t.admissible is not None:
            t.admissible = [_text(a) for a in t.admissible] if isinstance(t.admissible, list) else None
        t.prompt_ids = _numbers(t.prompt_ids, int)
        t.response_ids = _numbers(t.response_ids, int)
        t.student_logprobs = _numbers(t.student_logprobs, float)
        t.teacher_logprobs = _numbers(t.teacher_logprobs, float)
        t.disagreement = _number(t.disagreement, None)
        t.uncertainty = _number(t.uncertainty, None)
        t.weight = _number(t.weight, None)
    return ep, repr(ep) != before


# ---------------------------------------------------------------------------- filters


OUTCOMES = ("all", "success", "failure")


@dataclass
class EpisodeFilter:
    """What the inspector's list shows. Empty fields match everything."""

    env: str | None = None
    outcome: str = "all"          # one of OUTCOMES
    step: str = ""                # "120", or a range "100-200"
    text: str = ""                # case-insensitive search in task id, policy, text of turns

    def matches(self, ep: Episode, search_text: str | None = None) -> bool:
        """`search_text` is episode_search_text(ep) if the caller has it cached."""
        if self.env and ep.env != self.env:
            return False
        if self.outcome == "success" and not ep.success:
            return False
        if self.outcome == "failure" and ep.success:
            return False
        if self.step.strip() and not _step_matches(ep.step, self.step):
            return False
        if self.text.strip():
            needle = self.text.strip().lower()
            if needle not in (search_text if search_text is not None else episode_search_text(ep)):
                return False
        return True

    def apply(self, episodes: list[Episode], search_texts: list[str] | None = None) -> list[int]:
        """Indices of the matching episodes, in file order."""
        if search_texts is None:
            return [i for i, ep in enumerate(episodes) if self.matches(ep)]
        return [i for i, ep in enumerate(episodes) if self.matches(ep, search_texts[i])]


def _step_matches(step: int | None, spec: str) -> bool:
    if step is None:
        return False
    spec = spec.strip()
    lo, sep, hi = spec.partition("-")
    try:
        if sep:
            return (int(lo) if lo.strip() else -math.inf) <= step <= (int(hi) if hi.strip() else math.inf)
        return step == int(spec)
    except ValueError:
        return False  # an unparsable step filter matches nothing; the screen says so


def step_filter_valid(spec: str) -> bool:
    spec = spec.strip()
    if not spec:
        return True
    lo, sep, hi = spec.partition("-")
    parts = [lo, hi] if sep else [lo]
    try:
        for p in parts:
            if p.strip():
                int(p)
    except ValueError:
        return False
    return bool(sep) or bool(lo.strip())


def episode_search_text(ep: Episode) -> str:
    parts = [ep.task_id, ep.policy, ep.env, ep.final_observation]
    for t in ep.turns:
        parts += [t.observation, t.response, t.action or "", t.feedback]
    return "\n".join(str(p) for p in parts).lower()


# ---------------------------------------------------------------------------- summary numbers


@dataclass
class EpisodeStats:
    """Numbers the inspector's summary shows for an episode."""

    turns: int
    invalid: int
    total_reward: float
    mean_weight: float | None
    mean_disagreement: float | None
    mean_abs_log_ratio: float | None
    tokens: int
    has_teacher: bool
    extras: dict = field(default_factory=dict)


def episode_stats(ep: Episode) -> EpisodeStats:
    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    weights = [t.weight for t in ep.turns if isinstance(t.weight, (int, float))]
    dis = [t.disagreement for t in ep.turns if isinstance(t.disagreement, (int, float))]
    ratios: list[float] = []
    tokens = 0
    for t in ep.turns:
        tokens += len(t.response_ids or [])
        if t.student_logprobs and t.teacher_logprobs:
            ratios += [abs(a - b) for a, b in zip(t.teacher_logprobs, t.student_logprobs)
                       if isinstance(a, (int, float)) and isinstance(b, (int, float))]
    return EpisodeStats(
        turns=ep.num_turns, invalid=ep.num_invalid,
        total_reward=sum(t.reward for t in ep.turns if isinstance(t.reward, (int, float))),
        mean_weight=mean(weights), mean_disagreement=mean(dis), mean_abs_log_ratio=mean(ratios),
        tokens=tokens, has_teacher=any(t.teacher_logprobs for t in ep.turns))
