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
            root: Path | None = None, max_turns: int = 0, log=print, force: bool = False,
            base: str | None = None, dtype: str | None = None, precision: str = "fp32",
            episodes_out: Path | None = None) -> Path:
    """Write zoo entry `name` from checkpoint `src`: weights in `dtype` (default float16; float32
    keeps a small model bit-exact), tokenizer, and a card with the
    command chain, the versions, the sha256 of every file and the evaluation of the stored model
    on the eval and unseen splits (`episodes` each, at `temperature`). The name, the numbers (the
    bounds of EvalConfig) and the entry's directory (io.check_output: new or an earlier model;
    force: a foreign one too) are checked before any work.

    base: SRC is a LoRA adapter (CHECKPOINT/adapter as LoRA training saves it, or the adapter dir)
    over preset `base`; the entry stores the adapter only (dtype: cast it, e.g. float16; default: as saved)
    with the base's name, version and weights sha256 in its card, and the merged model is what is
    evaluated.

    precision: the weights the evaluation decodes with: fp32 (as load_model gives on CPU) or bf16
    (about 2x faster on CPUs with native bf16, for models whose fp32 evaluation takes hours); the
    card records it and its eval commands repeat it. episodes_out: also keep each split's episodes
    and report there (episodes_out/eval, episodes_out/unseen: `atod-edge tui` opens them), checked
    like any evaluation output before any work."""
    from atod_edge.config import from_dict
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate, save_eval

    root = root or ZOO_ROOT
    if not ZOO_NAME_RE.fullmatch(name or ""):
        raise UserError(f"zoo name '{name}': expected a plain name like household-teacher (letters, digits, "
                        "'.', '_' and '-', not starting with '.' or '-')")
    from_dict(EvalConfig, {"env": env, "episodes": episodes, "temperature": temperature, "max_turns": max_turns})
    if precision not in ("fp32", "bf16"):
        raise UserError(f"evaluation precision '{precision}': expected fp32 or bf16")
    earlier_entry = (root / name / CARD_JSON).is_file()   # an earlier zoo entry (a full model or an adapter)
    check_output(root / name, "model", force=force or earlier_entry, what="zoo entry")
    if episodes_out is not None:
        for split in ("eval", "unseen"):
            check_output(Path(episodes_out) / split, "eval")
    if dtype not in (None, "float32", "float16", "bfloat16"):
        raise UserError(f"storage dtype '{dtype}': expected float32, float16 or bfloat16")
    import torch
    import transformers

    import atod_edge
    from atod_edge.models.loading import load_model
    from atod_edge.engine.policy import TorchPolicy

    if base is None:
        model, tokenizer = load_model(src)
    source_card = _source_card(Path(src))
    with atomic_path(root / name, kind=None if force or earlier_entry else "model") as tmp:
        tmp.mkdir(parents=True)
        if base is None:
            model.to(getattr(torch, dtype or "float16")).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            stored_dir, base_card = tmp, None
        else:
            stored_dir, base_card = _store_adapter(src, base, tmp, name, dtype)
        # Evaluate what users will load: the stored file, upcast to fp32 as load_model does on CPU
        # (for an adapter: the stored adapter merged into its base).
        policy = TorchPolicy.load(str(stored_dir), precision="auto" if precision == "fp32" else precision)
        policy.name, stored = name, policy.model
        evaluation: dict[str, Any] = {"temperature": temperature, "episodes": episodes}
        if precision != "fp32":
            evaluation["precision"] = precision
        for split in ("eval", "unseen"):
            started = time.perf_counter()
            cfg = EvalConfig(env=env, split=split, episodes=episodes, temperature=temperature,
                             max_turns=max_turns)
            summary, split_episodes = evaluate(policy, cfg)
            if episodes_out is not None:
                save_eval(Path(episodes_out) / split, summary, split_episodes)
            evaluation[split] = {k: summary[k] for k in ("episodes", "success", "success_ci95", "score",
                                                          "turns", "invalid_rate")}
            log(f"{name}: {split} split {summary['success']:.1%} of {episodes} "
                f"({time.perf_counter() - started:.0f} s)")
        files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        card = {
            "card_version": CARD_VERSION, "name": name, "env": env, "description": description,
            "params": sum(p.numel() for p in stored.parameters()),
            "storage_dtype": (dtype or "float16") if base_card is None else _adapter_dtype(tmp),
            "chain": list(chain), "trained_on": trained_on or f"{platform.machine()} CPU",
            "source": str(src), "source_card": source_card,
            "versions": {"atod_edge": atod_edge.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "evaluation": evaluation, "eval_command": _eval_command(name, env, episodes, temperature, precision),
            "published": time.strftime("%Y-%m-%d"), "files": files,
        }
        if base_card is not None:
            card["base"] = base_card
            card["adapter"] = {k: v for k, v in _adapter_config(tmp).items()
                               if k in ("r", "lora_alpha", "target_modules", "use_rslora")}
        atomic_write_json(tmp / CARD_JSON, card)
        atomic_write_text(tmp / CARD_MD, card_markdown(card))
    forget_verified(root / name)
    return root / name



def _store_adapter(src: str, base: str, tmp: Path, name: str, dtype: str | None) -> tuple[Path, dict]:
    """Copy SRC's LoRA adapter into the new entry `tmp` (cast to `dtype` if given), check it was
    trained on this machine's `base` preset and fits it; return (the merged model dir, the card's base)."""
    import torch
    from safetensors.torch import load_file, save_file

    from atod_edge.models import adapters
    from atod_edge.models.presets import PRESETS, build_preset

    if base not in PRESETS:
        raise UserError(f"--base '{base}': not a preset (choices: {', '.join(PRESETS)})")
    adapter_dir = adapters.adapter_source(src)
    config = adapters.adapter_settings(adapter_dir)
    base_dir = build_preset(base)
    adapters.check_trained_on(src, adapter_dir, base_dir, base)
    config["base_model_name_or_path"] = base   # not the trainer's local path
    atomic_write_json(tmp / adapters.ADAPTER_CONFIG, config)
    tensors = load_file(str(adapter_dir / adapters.ADAPTER_WEIGHTS))
    if dtype:
        tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp / adapters.ADAPTER_WEIGHTS), metadata={"format": "pt"})
    base_card = adapters.base_record(base, base_dir)
    files = {f: {"sha256": file_sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in adapters.ADAPTER_FILES}
    merged = adapters.merged_dir(name, tmp, {"files": files, "base": base_card}, base_dir)
    return merged, base_card


def _adapter_config(entry: Path) -> dict:
    return json.loads((entry / "adapter_config.json").read_text(encoding="utf-8"))


def _adapter_dtype(entry: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(entry / "adapter_model.safetensors"), framework="pt") as f:
        kinds = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    return ",".join(sorted(names.get(k, k) for k in kinds)) + " (LoRA adapter only)"


def _source_card(src: Path) -> dict:
    try:
        return json.loads((src / "atod_edge.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}



def _eval_command(name: str, env: str, episodes: int, temperature: float, precision: str = "fp32") -> list[str]:
    extra = f" --set precision={precision}" if precision != "fp32" else ""
    return [f"atod-edge eval --model {name} --env {env} --split {split} --episodes {episodes} "
            f"--temperature {temperature}{extra}" for split in ("eval", "unseen")]



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
    base = card.get("base")
    if base:
        version = base.get("wheel_version") or f"atod_edge {base.get('atod_edge', '?')}"
        digests = ", ".join(f"{f} sha256 `{h}`" for f, h in sorted(base["sha256"].items()))
        files += (f"\n\nA LoRA adapter only, over the preset `{base['preset']}` "
                  f"({base.get('source') or base.get('kind')}, version {version}; base weights: {digests}). "
                  "Loading it by name builds the base, checks those sha256 and merges the adapter into it.")
    weights = ", decoded with bf16 weights" if evaluation.get("precision") == "bf16" else ""
    return f"""# {card['name']}

{card['description']}

- Environment: `{card['env']}`; {card['params']:,} parameters, stored in {card['storage_dtype']}
  (upcast to float32 when loaded on CPU).
- Trained on: {card['trained_on']}. Published {card['published']} with {versions}.

## Evaluation (the stored file{weights}; temperature {evaluation['temperature']}, seed 0, tasks 0-{evaluation['episodes'] - 1})

| split | episodes | success | 95% CI | turns | invalid actions |
|---|---|---|---|---|---|
{chr(10).join(rows)}

```bash
{evals}
```

## How it was made ({f"a LoRA adapter over the `{base['preset']}` preset, " if base else ""}seeds in the commands)

```bash
{chain}
```

## Files

{files}
"""
