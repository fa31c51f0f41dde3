"""Publishing a checkpoint into the model zoo: an fp16 copy, evaluated as stored, with its card
(the read-only side of the zoo, names and cards and checks, is atod_edge.models.zoo)."""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path
from typing import Any, Sequence

from atod_edge.errors import UserError
from atod_edge.io import atomic_path, atomic_write_json, atomic_write_text, check_output, file_sha256
from atod_edge.models.zoo import CARD_JSON, CARD_MD, CARD_VERSION, ZOO_ROOT, forget_verified


#: a zoo name: letters, digits, '.', '_', '-', not starting with a dot (a directory name on every OS)
ZOO_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def publish(src: str, name: str, chain: Sequence[str], env: str = "household", episodes: int = 300,
            temperature: float = 0.4, description: str = "", trained_on: str = "",
            root: Path | None = None, max_turns: int = 0, log=print, force: bool = False) -> Path:
    """Write zoo entry `name` from checkpoint `src`: fp16 weights, tokenizer, and a card with the
    command chain, the versions, the sha256 of every file and the evaluation of the stored model
    on the eval and unseen splits (`episodes` each, at `temperature`). The name, the numbers (the
    bounds of EvalConfig) and the entry's directory (io.check_output: new or an earlier model;
    force: a foreign one too) are checked before any work."""
    from atod_edge.config import from_dict
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate

    root = root or ZOO_ROOT
    if not ZOO_NAME_RE.fullmatch(name or ""):
        raise UserError(f"zoo name '{name}': expected a plain name like household-teacher (letters, digits, "
                        "'.', '_' and '-', not starting with '.' or '-')")
    from_dict(EvalConfig, {"env": env, "episodes": episodes, "temperature": temperature, "max_turns": max_turns})
    check_output(root / name, "model", force=force, what="zoo entry")
    import torch
    import transformers

    import atod_edge
    from atod_edge.models.loading import load_model
    from atod_edge.engine.policy import TorchPolicy

    model, tokenizer = load_model(src)
    source_card = _source_card(Path(src))
    with atomic_path(root / name, kind=None if force else "model") as tmp:
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
    forget_verified(root / name)
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
