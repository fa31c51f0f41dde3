"""Environment registry: built-in envs by name, third-party adapters, plug-ins by import path."""

from __future__ import annotations

import importlib

from atod_edge.envs.base import REQUIRED_METHODS, SPLITS, Env, StepResult, Task
from atod_edge.errors import UserError

__all__ = ["Env", "StepResult", "Task", "SPLITS", "make_env", "env_class", "list_envs"]

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


def env_class(spec: str) -> type:
    """Resolve an env name ("household") or an import path ("pkg.module:ClassName")."""
    target = BUILTIN.get(spec) or EXTRAS.get(spec) or spec
    if ":" not in target:
        raise UserError(f"unknown env '{spec}' (built-in: {', '.join(BUILTIN)}; "
                        "or give an import path like mypkg.module:MyEnv)")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"env '{spec}': cannot import module '{module_name}': {e}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"env '{spec}': module '{module_name}' has no attribute '{class_name}'")
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(cls, m, None))]
    if missing or not isinstance(getattr(cls, "name", None), str):
        what = ", ".join(missing) if missing else "a `name` string attribute"
        raise UserError(f"env '{spec}': {class_name} does not follow the env protocol (missing {what})")
    return cls


def make_env(spec: str) -> Env:
    return env_class(spec)()
