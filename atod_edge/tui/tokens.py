"""Response tokens for the token views, without any UI: decoding ids and pairing them with log-probs.

Data flow: an episode's turns carry response token ids and the student's and teacher's
log-probs (rollout/episode.py) -> TokenDecoder turns ids into text with a tokenizer.json found
next to the run (its checkpoints or its config), or shows bare ids -> `turn_tokens` gives one
TokenInfo per token, which the token view (widgets/token_view.py) colours by teacher - student.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atod_edge.errors import UserError
from atod_edge.rollout.episode import Turn
from atod_edge.tui.data import RunDir


@dataclass
class TokenInfo:
    """One response token with its log-probs; delta = teacher - student (nats)."""

    index: int
    token_id: int
    text: str
    student_logprob: float | None
    teacher_logprob: float | None

    @property
    def delta(self) -> float | None:
        if self.student_logprob is None or self.teacher_logprob is None:
            return None
        return self.teacher_logprob - self.student_logprob


class TokenDecoder:
    """Token id -> display string, with a tokenizer.json if one was found, else the bare id."""

    def __init__(self, tokenizer: Any | None = None, source: str | None = None):
        self._tokenizer = tokenizer
        self.source = source
        self._cache: dict[int, str] = {}

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def decode(self, token_id: int) -> str:
        if self._tokenizer is None:
            return f"{token_id} "
        text = self._cache.get(token_id)
        if text is None:
            try:
                text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            except Exception:  # a foreign or out-of-range id: show it rather than fail
                text = f"<{token_id}>"
            self._cache[token_id] = text
        return text

    @classmethod
    def load(cls, tokenizer: str | Path | None = None, run_dir: str | Path | None = None) -> tuple["TokenDecoder", str | None]:
        """Find a tokenizer: the explicit path first, then the run's checkpoints and config.

        Returns (decoder, notice); the notice explains why only ids are shown, if so.
        """
        candidates: list[Path] = []
        if tokenizer:
            candidates.append(Path(tokenizer))
        if run_dir:
            candidates += _tokenizer_candidates(Path(run_dir))
        for cand in candidates:
            file = cand if cand.is_file() else cand / "tokenizer.json"
            if not file.is_file():
                continue
            try:
                from tokenizers import Tokenizer

                return cls(Tokenizer.from_file(str(file)), str(file)), None
            except Exception as e:  # unreadable tokenizer: fall back to ids with a notice
                return cls(), f"cannot load tokenizer {file}: {e}"
        if tokenizer:
            return cls(), f"no tokenizer.json at {tokenizer}: showing token ids"
        return cls(), None


def _tokenizer_candidates(run_dir: Path) -> list[Path]:
    """Newest checkpoint first, then any directory named in the run's config."""
    out = list(reversed(RunDir(run_dir).checkpoints())) if run_dir.is_dir() else []
    try:
        config = RunDir(run_dir).config() if run_dir.is_dir() else {}
    except UserError:
        config = {}
    stack: list[Any] = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and ("/" in node or node.startswith(".")):
            p = Path(node) if Path(node).is_absolute() else run_dir / node
            for path in (p, Path(node)):
                if path.is_dir():
                    out.append(path)
    return out


def turn_tokens(turn: Turn, decoder: TokenDecoder) -> list[TokenInfo]:
    """The response tokens of a turn with their log-probs (lists of unequal length are padded)."""
    ids = turn.response_ids or []
    student = turn.student_logprobs or []
    teacher = turn.teacher_logprobs or []

    def at(values: list, i: int) -> float | None:
        v = values[i] if i < len(values) else None
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    return [TokenInfo(i, int(tid), decoder.decode(int(tid)), at(student, i), at(teacher, i))
            for i, tid in enumerate(ids) if isinstance(tid, int)]
