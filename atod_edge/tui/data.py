"""What the dashboard reads, without any UI: metrics logs, run directories, and which screen a path opens.

Data flow: the trainer writes a run directory (metrics.jsonl, config.yaml, samples/, report.json,
checkpoints/) -> RunDir and MetricsLog read it, also while it is being written -> the dashboard
screen plots and lists it. Episode files are read by episodes.py, tokens by tokens.py.

Everything here tolerates files that are torn, corrupt, from an older schema or still being
written: a problem becomes a count or a notice string, never an exception the UI has to catch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from atod_edge.errors import UserError
from atod_edge.io import parse_json_line

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
            obj = parse_json_line(raw)   # None: corrupt, not an object, too deep or too long
            if obj is None:
                self.skipped += 1
            else:
                self.rows.append(obj)
                added += 1
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
        except (OSError, ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    def checkpoints(self) -> list[Path]:
        root = self.path / "checkpoints"
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


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
        from atod_edge.models.presets import PRESETS
    except ImportError:
        return False
    return name in PRESETS
