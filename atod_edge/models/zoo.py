"""The model zoo: trained checkpoints that the project's own commands produced, kept in the package
so that compute spent once is not spent again on every machine.

Each model is a directory `atod_edge/zoo/<name>/` holding a transformers checkpoint (config.json,
model.safetensors stored in fp16 and upcast to fp32 when loaded on CPU, the tokenizer files) and
its card: `CARD.md` for people, `card.json` for code. The card records how the model was made
(the exact command chain from a preset, seeds, software versions, where it was trained) and its
measured evaluation (eval and unseen splits, temperature 0.4, success with 95% interval, invalid
rate), and the sha256 and size of every file. A file that does not match its card (corrupt,
truncated, replaced) is refused with one line naming it, before transformers reads it.

`atod-edge models publish SRC --name NAME --chain FILE` makes an entry (`publish` below): an fp16
copy of SRC, evaluated as stored, and its card. Zoo models load by name anywhere a model is
accepted (`--model household-teacher`, `teacher: household-teacher`), through
`atod_edge.models.presets.resolve_model`.

An entry may instead be a LoRA adapter only (adapter_config.json, adapter_model.safetensors) over a
named base preset: its card's `base` names the preset, the version it came from and the sha256 of
the base weights it was trained on (`adapter_base`); models/adapters.py checks the base and merges.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from atod_edge.errors import UserError
from atod_edge.io import file_sha256

# $ATOD_EDGE_ZOO points at another zoo directory (a copy under test, a private zoo).
ZOO_ROOT = Path(os.environ.get("ATOD_EDGE_ZOO") or Path(__file__).parents[1] / "zoo")
CARD_JSON = "card.json"
CARD_MD = "CARD.md"
CARD_VERSION = 1

_verified: dict[Path, tuple] = {}  # directory -> the (size, mtime) of its files when last verified


def names(root: Path | None = None) -> list[str]:
    """The zoo's model names (directories with a card.json)."""
    root = root or ZOO_ROOT
    return sorted(p.name for p in root.iterdir() if (p / CARD_JSON).is_file()) if root.is_dir() else []


def is_zoo_name(text: str, root: Path | None = None) -> bool:
    root = root or ZOO_ROOT
    return "/" not in text and "\\" not in text and text in names(root)


def read_card(name: str, root: Path | None = None) -> dict[str, Any]:
    root = root or ZOO_ROOT
    path = root / name / CARD_JSON
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"zoo model '{name}' not found (zoo models: {', '.join(names(root)) or 'none'})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"zoo card {path} is unreadable or not valid JSON ({type(e).__name__})") from None
    if not isinstance(card, dict) or not isinstance(card.get("files"), dict):
        raise UserError(f"zoo card {path} has no 'files' table (sha256 of each file)")
    if not card["files"]:
        raise UserError(f"zoo card {path} lists no files (its 'files' table is empty): nothing can be checked")
    for file_name, entry in card["files"].items():
        if (not file_name or "/" in file_name or "\\" in file_name or file_name.startswith(".")
                or not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int)
                or not isinstance(entry.get("sha256"), str)):
            raise UserError(f"zoo card {path}: malformed 'files' entry {file_name!r} "
                            "(expected a plain file name with its bytes and sha256)")
    base = card.get("base")
    if base is not None and (not isinstance(base, dict) or not isinstance(base.get("preset"), str)
                             or not isinstance(base.get("sha256"), dict) or not base["sha256"]
                             or not all(isinstance(v, str) for v in base["sha256"].values())
                             or not {"adapter_config.json", "adapter_model.safetensors"} <= set(card["files"])):
        raise UserError(f"zoo card {path}: malformed adapter entry (expected 'base' with its preset and the "
                        "sha256 of its weights, and the adapter's two files in 'files')")
    return card


def adapter_base(card: dict[str, Any]) -> dict[str, Any] | None:
    """The base of an adapter-only entry (preset, version, weights sha256), or None for a full model."""
    return card.get("base") if isinstance(card.get("base"), dict) else None


def model_dir(name: str, root: Path | None = None) -> Path:
    """The verified directory of zoo model `name`: every file the card lists exists with its
    recorded size and sha256 (checked once per process while the files stay unchanged)."""
    root = root or ZOO_ROOT
    card = read_card(name, root)
    directory = root / name
    # every file transformers could read must be one the card vouches for: an unlisted weight
    # shard, tokenizer or config would be loaded unchecked
    unlisted = sorted(p.name for p in directory.iterdir()
                      if p.name not in card["files"] and p.name not in (CARD_JSON, CARD_MD) and not p.is_dir())
    if unlisted:
        more = f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else ""
        raise UserError(f"zoo model '{name}': {directory / unlisted[0]} is not listed in its card "
                        f"({', '.join(unlisted[:3])}{more} unlisted): every file must carry its sha256")
    stamp = []
    for file_name, expected in sorted(card["files"].items()):
        path = directory / file_name
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise UserError(f"zoo model '{name}': {path} is missing") from None
        stamp.append((file_name, stat.st_size, stat.st_mtime_ns))
    stamp = tuple(stamp)
    if _verified.get(directory) == stamp:
        return directory
    for file_name, expected in sorted(card["files"].items()):
        path = directory / file_name
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise UserError(f"zoo model '{name}': {path} is truncated or corrupt "
                            f"({size} bytes, the card says {expected.get('bytes')})")
        if file_sha256(path) != expected.get("sha256"):
            raise UserError(f"zoo model '{name}': {path} is corrupt (sha256 does not match its card)")
    _verified[directory] = stamp
    return directory


def forget_verified(directory: Path) -> None:
    """Check `directory` again on its next load (a publish has just rewritten it)."""
    _verified.pop(directory, None)


def weights_sha256(name: str, root: Path | None = None) -> str:
    """The sha256 of a zoo model's weights, from its card: a key for what was derived from it (for
    an adapter entry, a digest of the adapter's and the base weights' sha256)."""
    return card_weights_key(read_card(name, root))


def card_weights_key(card: dict[str, Any]) -> str:
    """weights_sha256 of a card already read."""
    base = adapter_base(card)
    if base is None:
        return card["files"]["model.safetensors"]["sha256"]
    parts = {"adapter": {f: v["sha256"] for f, v in sorted(card["files"].items()) if f.startswith("adapter_")},
             "base": base["sha256"]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def summary_line(card: dict[str, Any]) -> str:
    """e.g. 'household eval 63.0% [57.4%, 68.2%] of 300, unseen 41.3% of 300 (temperature 0.4)'."""
    evaluation = card.get("evaluation") or {}
    parts = []
    for split in ("eval", "unseen"):
        s = evaluation.get(split)
        if s:
            low, high = s["success_ci95"]
            parts.append(f"{split} {s['success']:.1%} [{low:.1%}, {high:.1%}] of {s['episodes']}")
    base = adapter_base(card)
    over = f"adapter over {base['preset']}; " if base else ""
    if not parts:
        return over + "not evaluated"
    return (over + f"{card.get('env', '?')} " + ", ".join(parts)
            + f" (temperature {evaluation.get('temperature', '?')})")
