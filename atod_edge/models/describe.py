"""Describing models without running them: `model_info` (what a checkpoint is, read from its files)
and `list_models` (the rows of `atod-edge models list`: presets and zoo models).

The top of models/ beside surgery.py: it stands on presets.py (resolution, the registry) and
loading.py (the tokenizer); the CLI reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from atod_edge.models import zoo
from atod_edge.models.cache import preset_dir, read_card
from atod_edge.models.loading import load_tokenizer
from atod_edge.models.presets import PRESETS, preset_is_built, resolve_model

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                      "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def model_info(path_or_name: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint is, read from its files without loading the weights into a model."""
    from safetensors import safe_open

    path = resolve_model(path_or_name)
    config = json.loads((path / "config.json").read_text())
    params, dtypes = 0, set()
    for weights in sorted(path.glob("*.safetensors")):
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                tensor_slice = f.get_slice(key)
                shape = tensor_slice.get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                params += count
                dtypes.add(SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), tensor_slice.get_dtype()))
    tokenizer = load_tokenizer(path)
    return {
        "path": str(path),
        "arch": (config.get("architectures") or [config.get("model_type", "?")])[0],
        "params": params,
        "layers": config.get("num_hidden_layers"),
        "hidden": config.get("hidden_size"),
        "vocab": config.get("vocab_size"),
        "dtype": ",".join(sorted(dtypes)) or config.get("torch_dtype") or config.get("dtype"),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "tokenizer": _tokenizer_kind(path, tokenizer),
        "size_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
    }


def _tokenizer_kind(path: Path, tokenizer) -> str:
    try:
        spec = json.loads((path / "tokenizer.json").read_text())
    except (OSError, json.JSONDecodeError):
        return type(tokenizer).__name__
    kind = (spec.get("model") or {}).get("type", "?")
    pre = spec.get("pre_tokenizer") or {}
    parts = [pre.get("type")] + [p.get("type") for p in pre.get("pretokenizers", []) or []]
    byte_level = "ByteLevel" in parts or (spec.get("model") or {}).get("byte_fallback")
    return f"{'byte-level ' if byte_level else ''}{kind} ({len(tokenizer)} tokens)"


def format_params(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count / 1e3:.1f}K"


def list_models() -> list[dict[str, str]]:
    """Rows for `atod-edge models list`: name, kind, params, where (cache path or 'not built'),
    description (for zoo models: the measured success from the card)."""
    rows = []
    for preset in PRESETS.values():
        built = preset_is_built(preset)
        card = read_card(preset_dir(preset.name)) if built else {}
        params = format_params(card["params"]) if "params" in card else preset.nominal_params
        where = str(preset_dir(preset.name)) if built else (
            "not built (built on first use)" if preset.kind == "tiny"
            else "not downloaded (fetched from PyPI on first use)")
        rows.append({"name": preset.name, "kind": preset.kind, "params": params,
                     "where": where, "description": preset.description})
    for name in zoo.names():
        card = zoo.read_card(name)
        rows.append({"name": name, "kind": "zoo", "params": format_params(card.get("params", 0)),
                     "where": str(zoo.ZOO_ROOT / name), "description": zoo.summary_line(card)})
    return rows
