"""What the screens read, without any UI: metrics logs, run directories, episode filters, tokens.

Everything here tolerates files that are torn, corrupt, from an older schema or still being
written: a problem becomes a count or a notice string, never an exception the UI has to catch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atod_edge.rollout.episode import Episode, Turn, read_episodes
from atod_edge.errors import UserError

# Training-step keys the dashboard plots, in display order: (metrics key, title).
CURVES: list[tuple[str, str]] = [
    ("success", "success"),
    ("eval_success", "eval success"),
    ("reward", "reward"),
    ("episode_len", "episode length"),
    ("kappa", "kappa (OPD weight)"),   # train/schedule.py: kappa scales the OPD advantage,
    ("rho", "rho (GRPO weight)"),      # rho the GRPO one
    ("mean_turn_weight", "mean turn weight"),
    ("mean_abs_log_ratio", "|log-ratio|"),
    ("loss", "loss"),
]


# ---------------------------------------------------------------------------- metrics


class MetricsLog:
    """An append-only metrics.jsonl read incrementally: `poll()` picks up only the new lines.

    A last line without its newline may still be being written, so it is held back until it is
    complete; a complete line that is not a JSON object is counted in `skipped`. If the file
    shrinks (a new run reusing the directory) it is re-read from the start.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.skipped = 0
        self._offset = 0
        self._pending = b""

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def poll(self) -> int:
        """Read lines appended since the last poll. Returns how many rows were added."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return 0
        if size < self._offset:
            self.rows, self.skipped, self._offset, self._pending = [], 0, 0, b""
        if size == self._offset:
            return 0
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(size - self._offset)
        except OSError:
            return 0
        self._offset += len(chunk)
        data = self._pending + chunk
        *lines, self._pending = data.split(b"\n")
        added = 0
        for raw in lines:
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.skipped += 1
                continue
            if isinstance(obj, dict):
                self.rows.append(obj)
                added += 1
            else:
                self.skipped += 1
        return added

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs for rows that carry a finite number under `key`."""
        return metric_series(self.rows, key)

    def last(self, key: str) -> float | None:
        values = self.series(key)
        return values[-1][1] if values else None


def metric_series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    out = []
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        step = row.get("step")
        out.append((step if isinstance(step, int) else i, float(value)))
    return out


# ---------------------------------------------------------------------------- run directories


def is_run_dir(path: Path) -> bool:
    """A training run directory: metrics.jsonl, or the trainer's other outputs while it starts."""
    return path.is_dir() and any((path / name).exists()
                                 for name in ("metrics.jsonl", "config.yaml", "run.json", "samples"))


class RunDir:
    """A training run directory written by the trainer (possibly right now)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"run directory not found: {self.path}")
        self.metrics = MetricsLog(self.path / "metrics.jsonl")

    def config_text(self) -> str:
        config = self.path / "config.yaml"
        try:
            return config.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "# no config.yaml in this run directory (yet)\n"

    def config(self) -> dict:
        """The resolved config as a dict; {} if it is missing or not valid YAML."""
        import yaml

        try:
            data = yaml.safe_load(self.config_text())
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}

    def sample_files(self) -> list[Path]:
        samples = self.path / "samples"
        return sorted(samples.glob("step_*.jsonl")) if samples.is_dir() else []

    def latest_sample(self) -> Path | None:
        files = self.sample_files()
        return files[-1] if files else None

    def report(self) -> dict | None:
        """report.json once the run has finished; None while it runs or if it is unreadable."""
        try:
            data = json.loads((self.path / "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def checkpoints(self) -> list[Path]:
        root = self.path / "checkpoints"
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


# ---------------------------------------------------------------------------- episodes


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
    from atod_edge.rollout.episode import SCHEMA_VERSION

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


# ---------------------------------------------------------------------------- tokens


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


# ---------------------------------------------------------------------------- opening paths


def classify_path(path: str | Path | None) -> str:
    """Which screen a path opens: "dashboard", "inspector" or "live" (a model or nothing)."""
    if path is None or str(path) == "":
        return "live"
    p = Path(path)
    if not p.exists():
        if _is_preset(str(path)):
            return "live"   # a built-in model preset, e.g. tiny-student
        raise UserError(f"path not found: {p}")
    if p.is_dir():
        if (p / "metrics.jsonl").exists() or is_run_dir(p):
            return "dashboard"
        if (p / "config.json").is_file() or any(p.glob("*.onnx")) or any(p.glob("*.gguf")):
            return "live"
        raise UserError(f"{p}: not a run directory (no metrics.jsonl) and not a model "
                        "directory (no config.json, .onnx or .gguf)")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return "inspector"
    if suffix in (".onnx", ".gguf"):
        return "live"
    raise UserError(f"{p}: cannot open this file (expected an episodes .jsonl, an .onnx or a .gguf)")


def _is_preset(name: str) -> bool:
    try:
        from atod_edge.models.loading import PRESETS
    except ImportError:
        return False
    return name in PRESETS
