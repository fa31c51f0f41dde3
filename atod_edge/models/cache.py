"""The preset cache on disk, the lowest room of models/: what a built-in preset is (`Preset`), where
it is built (`preset_dir`, under `cache_dir()`), the card each build leaves beside its weights
(`PRESET_CARD`, read by `read_card`) and the file lock that keeps two processes from building one
preset at once.

The builders (tiny.py, smollm2.py) and the registry that calls them (presets.py) all stand on this
module; it imports nothing else from models/.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from atod_edge.io import cache_dir

PRESET_CARD = "atod_edge.json"


@dataclass(frozen=True)
class Preset:
    """A built-in model: how to build it and what it is."""

    name: str
    kind: str  # "tiny" (built locally) or "pypi-gguf" (downloaded from PyPI)
    description: str
    llama: dict[str, Any] = field(default_factory=dict)  # LlamaConfig fields for tiny presets
    seed: int = 0
    nominal_params: str = ""


def preset_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def read_card(path: Path) -> dict:
    """The card (`PRESET_CARD`) of a built directory, or {} if it has none or it is unreadable."""
    try:
        return json.loads((path / PRESET_CARD).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` for the block (a no-op where fcntl is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the atomic rename still keeps builds whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
