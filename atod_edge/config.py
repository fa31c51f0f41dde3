"""Typed configs: dataclasses filled from YAML recipes and `--set dotted.key=value` overrides.

Each field carries its help text and constraints in `field(metadata=...)`:
    help     one line shown by `atod-edge config show`
    choices  allowed values
    min/max  inclusive numeric bounds; every float must be finite, and an integer without a max
             has INT_MAX (a count that allocates or loops gets a sane max of its own)

Validation happens once, here, at the edge; a bad value raises ConfigError naming the key, the
value given and what is allowed. Nothing deeper re-reads raw dicts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from atod_edge.errors import ConfigError

T = TypeVar("T")
RECIPES_DIR = Path(__file__).parent / "recipes"
#: the largest integer any config key takes unless its field says less: counts beyond it would
#: loop or allocate for ever
INT_MAX = 10**6
#: the largest seed: seeds are mixed into per-step, per-turn seeds (trainer: seed * 100_003 + step,
#: runner: that * 1_000_003 + turn) that must stay below 2**64 for torch's generators
SEED_MAX = 10**8 - 1
#: the most response tokens per turn (max_new_tokens) any config allows: the KV cache grows by them
MAX_NEW_TOKENS = 32768


def opt(default: Any, help: str, *, choices: list | None = None, min: float | None = None,
        max: float | None = None) -> Any:
    """A config field with its help text and constraints."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested(cls: type, help: str = "") -> Any:
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def resolve_recipe(recipe: str | None) -> Path | None:
    """A recipe is a YAML path or the name of a built-in recipe (atod_edge/recipes/NAME.yaml)."""
    if recipe is None:
        return None
    path = Path(recipe)
    if path.is_file():
        return path
    builtin = RECIPES_DIR / f"{recipe}.yaml"
    if builtin.is_file():
        return builtin
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise ConfigError(f"recipe '{recipe}' not found: not a file and not a built-in recipe ({names})")


def load_config(cls: type[T], recipe: str | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """Build a `cls` from defaults <- `base` <- recipe YAML <- `--set key=value` overrides."""
    raw: dict = {}
    if base:
        _deep_update(raw, base)
    path = resolve_recipe(recipe)
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"recipe {path}: cannot read it ({type(e).__name__})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"recipe {path}: not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path}: expected a mapping of keys to values, got {type(data).__name__}")
        _deep_update(raw, data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected dotted.key=value")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip(), parsed)
    return from_dict(cls, raw)


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{prefix}{key}' (allowed: {allowed})")
        kwargs[key] = _coerce(prefix + key, hints[key], value, fields[key].metadata)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field, for `config show --help-keys`."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(type(value), prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, repr(value), f.metadata.get("help", "")))
    return rows


def _coerce(key: str, hint: Any, value: Any, meta: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else hint
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", args[0] if args else Any, v, meta) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    elif hint is float:
        number = _as_float(value)
        if number is None:
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}': got {value!r}, must be a finite number")
        value = number
    elif hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        value = str(value)
    choices = meta.get("choices") if meta else None
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}': got {value!r}, allowed: {', '.join(map(str, choices))}")
    lo = meta.get("min") if meta else None
    hi = meta.get("max") if meta else None
    if hint is int and hi is None:
        hi = INT_MAX
    if (lo is not None or hi is not None) and value != value:  # NaN passes every comparison
        raise ConfigError(f"config key '{key}': got {value!r}, must be a number within its bounds")
    if lo is not None and value < lo:
        raise ConfigError(f"config key '{key}': got {value!r}, must be >= {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"config key '{key}': got {value!r}, must be <= {hi}")
    return value


def _as_float(value: Any) -> float | None:
    """A number as float, or None. Text such as "1e-4" counts: YAML 1.1 reads an exponent
    without a dot as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip():
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{p}' is not a section")
    node[parts[-1]] = value
