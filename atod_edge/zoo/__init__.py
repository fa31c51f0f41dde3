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
`atod_edge.models.resolve_model`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

from atod_edge.errors import UserError
from atod_edge.io import atomic_path, atomic_write_json, atomic_write_text, file_sha256

# $ATOD_EDGE_ZOO points at another zoo directory (a copy under test, a private zoo).
ZOO_ROOT = Path(os.environ.get("ATOD_EDGE_ZOO") or Path(__file__).parent)
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
    return card


def model_dir(name: str, root: Path | None = None) -> Path:
    """The verified directory of zoo model `name`: every file the card lists exists with its
    recorded size and sha256 (checked once per process while the files stay unchanged)."""
    root = root or ZOO_ROOT
    card = read_card(name, root)
    directory = root / name
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


def weights_sha256(name: str, root: Path | None = None) -> str:
    """The sha256 of a zoo model's weights, from its card: a key for what was derived from it."""
    return read_card(name, root)["files"]["model.safetensors"]["sha256"]


def summary_line(card: dict[str, Any]) -> str:
    """e.g. 'household eval 63.0% [57.4%, 68.2%] of 300, unseen 41.3% of 300 (temperature 0.4)'."""
    evaluation = card.get("evaluation") or {}
    parts = []
    for split in ("eval", "unseen"):
        s = evaluation.get(split)
        if s:
            low, high = s["success_ci95"]
            parts.append(f"{split} {s['success']:.1%} [{low:.1%}, {high:.1%}] of {s['episodes']}")
    if not parts:
        return "not evaluated"
    return f"{card.get('env', '?')} " + ", ".join(parts) + f" (temperature {evaluation.get('temperature', '?')})"


# --------------------------------------------------------------------------------------------
# Publishing: an fp16 copy of a trained checkpoint, evaluated as stored, with its card


def publish(src: str, name: str, chain: Sequence[str], env: str = "household", episodes: int = 300,
            temperature: float = 0.4, description: str = "", trained_on: str = "",
            root: Path | None = None, max_turns: int = 0, log=print) -> Path:
    """Write zoo entry `name` from checkpoint `src`: fp16 weights, tokenizer, and a card with the
    command chain, the versions, the sha256 of every file and the evaluation of the stored model
    on the eval and unseen splits (`episodes` each, at `temperature`)."""
    import torch
    import transformers

    import atod_edge
    from atod_edge.evaluate import EvalConfig, evaluate
    from atod_edge.models import load_model
    from atod_edge.policy import TorchPolicy

    root = root or ZOO_ROOT
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"zoo name '{name}': expected a plain name like household-teacher")
    model, tokenizer = load_model(src)
    source_card = _source_card(Path(src))
    with atomic_path(root / name) as tmp:
        tmp.mkdir(parents=True)
        model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # Evaluate what users will load: the fp16 file, upcast to fp32 as load_model does on CPU.
        stored, stored_tokenizer = load_model(tmp)
        policy = TorchPolicy(stored, stored_tokenizer, name=name)
        evaluation: dict[str, Any] = {"temperature": temperature, "episodes": episodes}
        for split in ("eval", "unseen"):
            started = time.perf_counter()
            cfg = EvalConfig(env=env, split=split, episodes=episodes, temperature=temperature,
                             max_turns=max_turns)
            summary, _ = evaluate(policy, cfg)
            evaluation[split] = {k: summary[k] for k in ("episodes", "success", "success_ci95", "score",
                                                          "turns", "invalid_rate")}
            log(f"{name}: {split} split {summary['success']:.1%} of {episodes} "
                f"({time.perf_counter() - started:.0f} s)")
        files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        card = {
            "card_version": CARD_VERSION, "name": name, "env": env, "description": description,
            "params": sum(p.numel() for p in stored.parameters()), "storage_dtype": "float16",
            "chain": list(chain), "trained_on": trained_on or f"{platform.machine()} CPU",
            "source": str(src), "source_card": source_card,
            "versions": {"atod_edge": atod_edge.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "evaluation": evaluation, "eval_command": _eval_command(name, env, episodes, temperature),
            "published": time.strftime("%Y-%m-%d"), "files": files,
        }
        atomic_write_json(tmp / CARD_JSON, card)
        atomic_write_text(tmp / CARD_MD, card_markdown(card))
    _verified.pop(root / name, None)
    return root / name


def _source_card(src: Path) -> dict:
    try:
        return json.loads((src / "atod_edge.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _eval_command(name: str, env: str, episodes: int, temperature: float) -> list[str]:
    return [f"atod-edge eval --model {name} --env {env} --split {split} --episodes {episodes} "
            f"--temperature {temperature}" for split in ("eval", "unseen")]


def card_markdown(card: dict[str, Any]) -> str:
    evaluation = card["evaluation"]
    rows = []
    for split in ("eval", "unseen"):
        s = evaluation.get(split)
        if s:
            low, high = s["success_ci95"]
            rows.append(f"| {split} | {s['episodes']} | {s['success']:.1%} | [{low:.1%}, {high:.1%}] | "
                        f"{s['turns']:.1f} | {s['invalid_rate']:.1%} |")
    versions = ", ".join(f"{k} {v}" for k, v in card["versions"].items())
    files = "\n".join(f"- `{f}`: {v['bytes']:,} bytes, sha256 `{v['sha256']}`" for f, v in card["files"].items()
                      if f not in (CARD_JSON, CARD_MD))
    chain = "\n".join(card["chain"])
    evals = "\n".join(card["eval_command"])
    return f"""# {card['name']}

{card['description']}

- Environment: `{card['env']}`; {card['params']:,} parameters, stored in {card['storage_dtype']}
  (upcast to float32 when loaded on CPU).
- Trained on: {card['trained_on']}. Published {card['published']} with {versions}.

## Evaluation (the stored file; temperature {evaluation['temperature']}, seed 0, tasks 0-{evaluation['episodes'] - 1})

| split | episodes | success | 95% CI | turns | invalid actions |
|---|---|---|---|---|---|
{chr(10).join(rows)}

```bash
{evals}
```

## How it was made (from the `tiny-teacher` preset, seeds in the commands)

```bash
{chain}
```

## Files

{files}
"""
