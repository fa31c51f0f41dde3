"""A trained, peaked model for export verification (issue 17 item 2, issue 20).

On a randomly initialised model every next-token distribution is nearly flat, so a broken file
barely moves the KL: scrambled attention rows gave 0.0002-0.04, under every quant cap. A model
that has learned the prompt format predicts most positions with confidence, and a broken tensor
shows. The tests verify the zoo's trained teacher (atod_edge/zoo/household-teacher: tiny-teacher,
4.75M parameters, 64% on household eval), loaded by name; nothing is trained here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PEAKED_MODEL = "household-teacher"


@pytest.fixture(scope="session")
def peaked_model(atod_cache) -> Path:
    """The checkpoint dir of the zoo teacher (its files checked against its card)."""
    from atod_edge.models.presets import resolve_model

    return Path(resolve_model(PEAKED_MODEL))


@pytest.fixture(scope="session")
def peaked_export(peaked_model, tmp_path_factory):
    """(export dir, report): the peaked model in every format, verified on 2 short household
    episodes (paired) with 2 expert and 2 on-policy contexts."""
    from atod_edge.export import VerifyConfig, export_model

    config = VerifyConfig(n_contexts=2, max_context_tokens=256, greedy_tokens=8, n_episodes=2,
                          max_turns=2, on_policy_contexts=2, speed_tokens=8, device="cpu", n_threads=1)
    out = tmp_path_factory.mktemp("peaked-export")
    report = export_model(peaked_model, out, onnx=True, int8=True,
                          gguf_quants=["f32", "f16", "q8_0", "q4_k_m"], config=config, n_threads=1)
    return out, report
