"""Environment registry: built-in envs by name, third-party adapters, plug-ins by import path."""

from __future__ import annotations

import contextlib
import importlib
import re

from atod_edge.envs.base import (REQUIRED_METHODS, SPLITS, Env, EnvProtocolError, StepResult, Task, checked_tasks,
                                 env_label)
from atod_edge.errors import UserError

__all__ = ["Env", "EnvProtocolError", "StepResult", "Task", "SPLITS", "make_env", "env_class", "env_tasks",
           "list_envs"]

# name -> "module:Class"; imported lazily so listing envs stays fast
BUILTIN: dict[str, str] = {
    "household": "atod_edge.envs.household.env:HouseholdEnv",
    "shop": "atod_edge.envs.shop:ShopEnv",
    "searchqa": "atod_edge.envs.searchqa:SearchQAEnv",
}
# third-party engines behind optional extras (pip install 'atod-edge[envs]' / '[alfworld]')
EXTRAS: dict[str, str] = {
    "textworld-cooking": "atod_edge.envs.textworld_env:TextWorldCookingEnv",
    "textworld-coin": "atod_edge.envs.textworld_env:TextWorldCoinEnv",
    "textworld-treasure": "atod_edge.envs.textworld_env:TextWorldTreasureEnv",
    "alfworld-engine": "atod_edge.envs.alfworld_env:AlfWorldEngineEnv",
}


def list_envs(include_extras: bool = True) -> dict[str, str]:
    return {**BUILTIN, **EXTRAS} if include_extras else dict(BUILTIN)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_class(spec: str) -> type:
    """Resolve an env name ("household") or an import path ("pkg.module:ClassName"). Any way the
    path can fail (malformed, the module raising anything at import, no such class, not an env)
    is one UserError line naming the env."""
    if not isinstance(spec, str):
        raise UserError(f"env: expected a name or an import path pkg.module:Class, got {type(spec).__name__}")
    target = BUILTIN.get(spec) or EXTRAS.get(spec) or spec
    if ":" not in target:
        raise UserError(f"unknown env '{spec}' (built-in: {', '.join(BUILTIN)}; "
                        "or give an import path like mypkg.module:MyEnv)")
    module_name, _, class_name = target.partition(":")
    if (not all(_IDENTIFIER.fullmatch(part) for part in module_name.split("."))
            or not all(_IDENTIFIER.fullmatch(part) for part in class_name.split("."))):
        raise UserError(f"env '{spec}': not an import path (expected pkg.module:ClassName)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"env '{spec}': cannot import module '{module_name}': {e}") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the plug-in's own code failed at import
        raise UserError(f"env '{spec}': importing module '{module_name}' failed: "
                        f"{type(e).__name__}: {_first_line(e)}") from None
    cls = module
    for part in class_name.split("."):
        cls = getattr(cls, part, None)
    if cls is None:
        raise UserError(f"env '{spec}': module '{module_name}' has no attribute '{class_name}'")
    if not isinstance(cls, type):
        raise UserError(f"env '{spec}': {class_name} is a {type(cls).__name__}, not an env class")
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(cls, m, None))]
    if missing or not isinstance(getattr(cls, "name", None), str):
        what = ", ".join(missing) if missing else "a `name` string attribute"
        raise UserError(f"env '{spec}': {class_name} does not follow the env protocol (missing {what})")
    return cls


def make_env(spec: str | type) -> Env:
    """A new instance of an env (name, import path or class); a constructor that raises is one
    UserError line naming the env."""
    cls = env_class(spec) if isinstance(spec, str) else spec
    try:
        return cls()
    except UserError:       # the env's own one-line message (e.g. a missing optional extra)
        raise
    except Exception as e:  # noqa: BLE001 - the env's own code
        raise UserError(f"env {env_label(cls)}: the constructor failed: {type(e).__name__}: {_first_line(e)}") from None


def env_tasks(spec: str | type, split: str, n: int, start: int = 0) -> list[Task]:
    """`n` tasks of `split` from a fresh instance (closed afterwards): a failing constructor or
    tasks() is one UserError line naming the env, and what tasks() returns is checked."""
    env = make_env(spec)
    try:
        try:
            tasks = env.tasks(split, n, start=start)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the env's own code
            raise UserError(f"env {env_label(env)}: tasks('{split}', {n}) failed: "
                            f"{type(e).__name__}: {_first_line(e)}") from None
        return checked_tasks(env, tasks, n)
    finally:
        close = getattr(env, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]
