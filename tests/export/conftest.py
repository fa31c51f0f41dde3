"""A trained, peaked model for export verification (issue 17 item 2).

On a randomly initialised model every next-token distribution is nearly flat, so a broken file
barely moves the KL: scrambled attention rows gave 0.0002-0.04, under every quant cap. A model
that has learned the prompt format predicts most positions with confidence, and a broken tensor
shows. Until the zoo's trained teacher exists, the session trains one with the project's own SFT
(tiny-student on scripted-expert household demos, about 30 s on 2 cores).

To verify on a zoo model instead, set PEAKED_MODEL to its name (e.g. "household-teacher"):
the one fixture below then loads it and trains nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PEAKED_MODEL: str | None = None

# measured on 2 shared cores: 229 turns, 30 steps, 26 s; household prompts then get a mean entropy
# of 3.8 nats per position (random init: 7.6), and one scrambled k_proj moves mean KL to ~0.7
SFT_SETTINGS = dict(env="household", model="tiny-student", demos="expert", episodes=30, epochs=2,
                    lr=3e-3, batch_size=16, micro_batch=16, warmup_steps=5, prompt_loss_weight=0.5,
                    eval_episodes=0, checkpoint_every=0)


@pytest.fixture(scope="session")
def peaked_model(atod_cache, tmp_path_factory) -> Path:
    """A checkpoint dir of a trained model with peaked next-token distributions."""
    from atod_edge.models import resolve_model

    if PEAKED_MODEL:
        return resolve_model(PEAKED_MODEL)
    from atod_edge.train.sft import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("peaked") / "sft-tiny-student"
    train_sft(SFTConfig(out=str(out), **SFT_SETTINGS), log=lambda message: None)
    return out


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
