"""Tests for train/lora.py and LoRA in the trainer: config checks, the merged state dict, a 3-step
run that trains only the adapters and saves a plain merged checkpoint, and resume."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import load_weights, metric_rows, overrides, same_weights

from atod_edge.config import load_config
from atod_edge.errors import ConfigError, UserError
from atod_edge.train.config import TrainConfig
from atod_edge.train.lora import peft_available
from atod_edge.train.trainer import train

needs_peft = pytest.mark.skipif(not peft_available(), reason="peft is not installed (extra: lora)")

LORA = ["lora.rank=4", "lora.alpha=8"]   # scale alpha / r = 2


@needs_peft
def test_lora_config_is_checked_at_the_edge():
    cfg = load_config(TrainConfig, None, LORA + ["lora.target_modules=q_proj,v_proj"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert load_config(TrainConfig, None, []).lora.rank == 0   # off by default
    with pytest.raises(ConfigError, match="lora.rank.*distributed=ddp"):
        load_config(TrainConfig, None, LORA + ["distributed=fsdp"])
    with pytest.raises(ConfigError, match="lora.target_modules"):
        load_config(TrainConfig, None, LORA + ["lora.target_modules=[]"])
    with pytest.raises(ConfigError, match="distributed"):
        load_config(TrainConfig, None, ["distributed=zero3"])


def test_without_peft_lora_is_one_line_naming_the_extra(monkeypatch):
    from atod_edge.train import lora

    monkeypatch.setattr(lora, "peft_available", lambda: False)
    with pytest.raises(ConfigError, match=r"needs peft, which is not installed: pip install 'atod-edge\[lora\]'"):
        load_config(TrainConfig, None, LORA)
    with pytest.raises(UserError, match="needs peft"):
        lora.require_peft()


@needs_peft
def test_unknown_target_modules_are_a_user_error(tiny_student):
    from copy import deepcopy

    from atod_edge.train.lora import add_adapters

    model, _ = tiny_student
    with pytest.raises(UserError, match="lora.target_modules.*nope"):
        add_adapters(deepcopy(model), 4, 8.0, 0.0, ["nope"])


@needs_peft
def test_merged_state_dict_is_the_plain_model_with_w_plus_scaled_ba(tiny_student, one_thread):
    from copy import deepcopy

    from atod_edge.train.lora import add_adapters, merged_state_dict

    model, _ = tiny_student
    plain_before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    wrapped = add_adapters(deepcopy(model), 4, 8.0, 0.0, ["q_proj", "down_proj"])
    base = wrapped.get_base_model()
    assert {n for n, p in base.named_parameters() if p.requires_grad} == \
        {n for n, _ in base.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_()
    merged = merged_state_dict(base)
    assert merged.keys() == plain_before.keys()
    a = base.get_submodule("model.layers.0.self_attn.q_proj")
    expected = plain_before["model.layers.0.self_attn.q_proj.weight"] + \
        2.0 * a.lora_B["default"].weight @ a.lora_A["default"].weight
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected)
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"],
                       plain_before["model.layers.0.self_attn.k_proj.weight"])   # not a target
    # a plain model holding the merged weights computes what the adapted model computes
    plain = deepcopy(model)
    plain.load_state_dict(merged)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


# --- the trainer with LoRA -------------------------------------------------------------------


def _adapter_weights(checkpoint):
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def lora_run(small_teacher, one_thread, tmp_path_factory):
    """A 3-step LoRA run; every rank dumps its live state dict at the end (a test hook)."""
    root = tmp_path_factory.mktemp("lora")
    dump = root / "dump"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATOD_EDGE_TEST_DUMP_WEIGHTS", str(dump))
        final = train(load_config(TrainConfig, None, overrides() + LORA), root / "run", "tiny-student",
                      str(small_teacher), log=lambda *a: None)
    return root / "run", final, torch.load(dump / "rank0.pt", weights_only=True)


@needs_peft
def test_lora_run_trains_only_the_adapters_and_saves_a_merged_plain_checkpoint(lora_run, atod_cache):
    from atod_edge.models.loading import load_model
    from atod_edge.models.presets import resolve_model

    run_dir, final, live = lora_run
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["grad_norm"] > 0 for r in rows)
    start = load_weights(resolve_model("tiny-student"))

    # the student's own weights are untouched; the adapters moved (B starts at zero)
    adapters = {k: v for k, v in live.items() if ".lora_" in k}
    frozen = {k.replace(".base_layer.", "."): v for k, v in live.items() if ".lora_" not in k}
    assert adapters and same_weights({k: frozen[k] for k in start}, start)
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)

    # the checkpoint is a plain transformers model: W + (alpha / r) B A, nothing of peft in it
    saved = load_weights(final)
    assert saved.keys() == start.keys() and not same_weights(saved, start)
    name = "model.layers.1.mlp.down_proj"
    delta = 2.0 * live[f"{name}.lora_B.default.weight"] @ live[f"{name}.lora_A.default.weight"]
    torch.testing.assert_close(saved[f"{name}.weight"], start[f"{name}.weight"] + delta)
    assert torch.equal(saved["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    model, _ = load_model(final)
    assert type(model).__name__ == "LlamaForCausalLM" and not any("lora" in k for k in model.state_dict())
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    assert not (final / "adapter_config.json").exists()   # transformers would try to load it as an adapter


@needs_peft
def test_lora_stop_after_one_step_then_resume_matches_the_uninterrupted_run(lora_run, small_teacher, tmp_path):
    reference_dir, reference_final, _ = lora_run
    run_dir = tmp_path / "short"
    train(load_config(TrainConfig, None, overrides(steps=1) + LORA), run_dir, "tiny-student", str(small_teacher),
          log=lambda *a: None)
    train(load_config(TrainConfig, None, overrides(steps=3) + LORA), run_dir, "tiny-student", str(small_teacher),
          resume=True, log=lambda *a: None)
    assert metric_rows(run_dir) == metric_rows(reference_dir)
    final = run_dir / "checkpoints" / "step_000003"
    assert same_weights(load_weights(final), load_weights(reference_final))
    assert same_weights(_adapter_weights(final), _adapter_weights(reference_final))
    state = torch.load(final / "trainer_state.pt", weights_only=True)
    reference = torch.load(reference_final / "trainer_state.pt", weights_only=True)
    for key, moments in reference["optimizer"]["state"].items():
        assert torch.equal(state["optimizer"]["state"][key]["exp_avg_sq"], moments["exp_avg_sq"])
    # resuming with other LoRA settings, or without LoRA, is one clear line
    with pytest.raises(UserError, match="lora settings"):
        train(load_config(TrainConfig, None, overrides(steps=4) + ["lora.rank=8"]), run_dir, "tiny-student",
              str(small_teacher), resume=True, log=lambda *a: None)
    with pytest.raises(UserError, match="trained with LoRA"):
        train(load_config(TrainConfig, None, overrides(steps=4)), run_dir, "tiny-student",
              str(small_teacher), resume=True, log=lambda *a: None)
