"""What the diff screen reads, without any UI: two episode files of two agents on the same tasks,
paired task by task, ordered flipped outcomes first, with each pair's turns aligned.

Pairing, outcomes and the paired difference come from atod_edge.evaluate.evaluate (the same functions
that wrote the pairing index of `atod-edge eval --model A --model B`), so the screen and the
eval report cannot disagree. Turns are aligned by index: both agents start from the same reset
of the same task, so turn k of A and turn k of B are the agents' k-th decisions; the first turn
where the parsed actions differ (or one episode has ended) is where the trajectories diverge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from atod_edge.rollout.episode import Episode, Turn
from atod_edge.errors import UserError
from atod_edge.evaluate.evaluate import compare_summary, outcome, pair_episodes
from atod_edge.tui.episodes import load_episodes

# task rows: A won (B failed), then B won (A failed), then ties
OUTCOME_ORDER = {"a": 0, "b": 1, "tie": 2}


def same_action(a: Turn, b: Turn) -> bool:
    norm = lambda t: " ".join((t.action or "").lower().split()) if t.action is not None else None  # noqa: E731
    return norm(a) == norm(b) and (a.action is not None or a.response == b.response)


@dataclass
class TaskPair:
    """One task both agents played."""

    task_id: str
    index_a: int
    index_b: int
    a: Episode
    b: Episode

    @property
    def outcome(self) -> str:
        """"a" when only A succeeded, "b" when only B did, "tie" otherwise."""
        return outcome(self.a, self.b)

    @property
    def flipped(self) -> bool:
        return self.outcome != "tie"

    def aligned_turns(self) -> list[tuple[Turn | None, Turn | None]]:
        """(A's turn k, B's turn k) for k up to the longer episode; None past the shorter's end."""
        n = max(self.a.num_turns, self.b.num_turns)
        return [(self.a.turns[k] if k < self.a.num_turns else None,
                 self.b.turns[k] if k < self.b.num_turns else None) for k in range(n)]

    @property
    def first_divergence(self) -> int | None:
        """Index of the first turn where the actions differ or only one agent acted; None when
        the two episodes took the same actions throughout."""
        for k, (ta, tb) in enumerate(self.aligned_turns()):
            if ta is None or tb is None or not same_action(ta, tb):
                return k
        return None


@dataclass
class DiffData:
    name_a: str
    name_b: str
    pairs: list[TaskPair]                    # flipped outcomes first
    summary: dict                            # atod_edge.evaluate.evaluate.compare_summary
    colour_by: str                           # "delta" (teacher - student) or "logprob"
    notices: list[str] = field(default_factory=list)

    @property
    def flipped(self) -> int:
        return sum(p.flipped for p in self.pairs)


def agent_name(episodes: list[Episode], path: Path) -> str:
    """Who acted in a file: the episodes' policy field, else the file's name."""
    names = {ep.policy for ep in episodes if ep.policy}
    if len(names) == 1:
        return names.pop()
    return path.parent.name if path.name == "episodes.jsonl" else path.stem


def has_teacher_scores(episodes: list[Episode]) -> bool:
    return any(t.teacher_logprobs and t.student_logprobs for ep in episodes for t in ep.turns)


def build_diff(episodes_a: list[Episode], episodes_b: list[Episode], name_a: str = "A",
               name_b: str = "B") -> DiffData:
    pairs = [TaskPair(episodes_a[i].task_id, i, j, episodes_a[i], episodes_b[j])
             for i, j in pair_episodes(episodes_a, episodes_b)]
    pairs.sort(key=lambda p: OUTCOME_ORDER[p.outcome])       # stable: task order within each group
    colour_by = "delta" if has_teacher_scores(episodes_a) or has_teacher_scores(episodes_b) else "logprob"
    return DiffData(name_a, name_b, pairs, compare_summary(episodes_a, episodes_b), colour_by)


def load_diff(path_a: str | Path, path_b: str | Path) -> DiffData:
    """Read and pair two episode files (UserError when a file is missing or they share no task)."""
    path_a, path_b = Path(path_a), Path(path_b)
    episodes_a, notice_a = load_episodes(path_a)
    episodes_b, notice_b = load_episodes(path_b)
    name_a, name_b = agent_name(episodes_a, path_a), agent_name(episodes_b, path_b)
    if name_a == name_b:
        name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"
    data = build_diff(episodes_a, episodes_b, name_a, name_b)
    if not data.pairs:
        raise UserError(f"{path_a} and {path_b} share no task: nothing to compare (run both agents on the "
                        "same tasks: atod-edge eval --model A --model B)")
    data.notices = [f"{p.name}: {n}" for p, n in ((path_a, notice_a), (path_b, notice_b)) if n]
    s = data.summary
    if s["unpaired_a"] or s["unpaired_b"]:
        data.notices.append(f"{s['unpaired_a']} episode(s) of A and {s['unpaired_b']} of B have no partner "
                            "on the same task (left out)")
    return data


def find_diff_tokenizer(path_a: str | Path, path_b: str | Path) -> str | None:
    """A tokenizer to decode the tokens with: beside a model named in the pairing index that
    `atod-edge eval --model A --model B` wrote above the two files (OUT/pairs.json), if any."""
    import json

    for episodes in (Path(path_a), Path(path_b)):
        index = episodes.parent.parent / "pairs.json"
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for side in ("a", "b"):
            name = (data.get(side) or {}).get("model") if isinstance(data, dict) else None
            if not isinstance(name, str) or not name:
                continue
            for folder in _model_folders(name):
                if (folder / "tokenizer.json").is_file():
                    return str(folder)
    return None


def _model_folders(name: str) -> list[Path]:
    """Where a model named in the index keeps its files: its dir (or a file's dir), or a built preset's."""
    model = Path(name)
    folders = [model, model.parent] if model.exists() else []
    try:
        from atod_edge.models.cache import preset_dir
        from atod_edge.models.presets import PRESETS

        if name in PRESETS:
            folders.append(preset_dir(name))
    except ImportError:
        pass
    return folders
