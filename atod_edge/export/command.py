"""The settings of `atod-edge export` (its argument handling is atod_edge/cli/export.py).

Verification settings come from VerifyConfig: `--set verify.KEY=VALUE` (repeatable; `atod-edge export
keys` lists them), with `--env` and `--episodes` as shortcuts for verify.env and verify.n_episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from atod_edge.config import nested
from atod_edge.errors import UserError

from .verify import VerifyConfig


@dataclass
class ExportSettings:
    """The `--set` namespace of `atod-edge export` (keys are verify.*)."""

    verify: VerifyConfig = nested(VerifyConfig, "export verification")


def verify_config(overrides: list[str], env: str | None = None, episodes: int | None = None) -> VerifyConfig:
    """VerifyConfig from `verify.KEY=VALUE` overrides and the --env / --episodes shortcuts."""
    from atod_edge.config import load_config

    items = list(overrides or [])
    for item in items:
        if not item.split("=", 1)[0].strip().startswith("verify."):
            raise UserError(f"--set '{item}': export settings are verify.KEY=VALUE "
                            "(`atod-edge export keys` lists them)")
    if env is not None:
        items.append(f"verify.env={env}")
    if episodes is not None:
        items.append(f"verify.n_episodes={episodes}")
    return load_config(ExportSettings, None, items).verify
