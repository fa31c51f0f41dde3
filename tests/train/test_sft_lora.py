"""LoRA in `atod-edge sft` (train/sft.py with train/lora.py) and demonstrations cut to the model's
context (train/demos.py): a tiny LoRA SFT run trains only the adapters and saves the merged plain
model with the adapter in OUT/adapter/ (publishable with `models publish --adapter`), resume
restores the adapter exactly, and an over-long demonstration is cut or skipped, never run past the
position embeddings."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from train_fixtures import interrupt_sft_at_step, load_weights, same_weights

from atod_edge.cli import main as cli
from atod_edge.config import load_config
from atod_edge.envs import env_class
from atod_edge.errors import ConfigError, UserError
from atod_edge.models.loading import load_model
from atod_edge.models.presets import resolve_model
from atod_edge.train.config import SFTConfig
from atod_edge.train.demos import build_examples, demo_episodes
from atod_edge.train.lora import ADAPTER_DIR, peft_available
from atod_edge.train.sft import train_sft, work_dir

# peft is installed in the project's venv (extra `lora`); without it only the config test runs
needs_peft = pytest.mark.skipif(not peft_available(), reason="peft is not installed (extra: lora)")

TARGETS = ["q_proj", "v_proj"]
# 1 expert episode (9 turns) in batches of 4: 3 steps an epoch, 6 in all; a checkpoint every 2 steps
RUN = ["model=tiny-student", "demos=expert", "episodes=1", "epochs=2", "batch_size=4", "micro_batch=4",
       "lr=1e-2", "warmup_steps=0", "eval_episodes=0", "checkpoint_every=2", "lora.rank=4", "lora.alpha=8",
       f"lora.target_modules=[{','.join(TARGETS)}]"]
TEXT = "You are in the kitchen. Your task is to: put a clean mug in the cabinet."


def _config(out, *more: str) -> SFTConfig:
    return load_config(SFTConfig, None, [*RUN, f"out={out}", *more])


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_config_errors_are_one_line(tmp_path, monkeypatch, capsys):
    assert load_config(SFTConfig, None, []).lora.rank == 0   # off by default: full fine-tuning
    with pytest.raises(ConfigError, match="lora.target_modules") as error:
        load_config(SFTConfig, None, ["lora.rank=4", "lora.target_modules=[]"])
    assert "\n" not in str(error.value)
    monkeypatch.chdir(tmp_path)
    code = cli.main(["sft", "--model", "tiny-student", "--set", "lora.rank=4", "--set", "lora.target_modules=[]"])
    err = capsys.readouterr().err
    assert code in (1, 2)
    assert len(err.strip().splitlines()) == 1 and "lora.target_modules" in err, err
    assert not any(tmp_path.iterdir())   # refused before any work


@pytest.fixture(scope="module")
def lora_run(atod_cache, one_thread, tmp_path_factory):
    """The uninterrupted 6-step LoRA SFT run (also the reference of the resume test)."""
    out = tmp_path_factory.mktemp("sft-lora") / "model"
    train_sft(_config(out), log=lambda *a: None)
    return out


@needs_peft
def test_lora_sft_trains_only_the_adapters(lora_run):
    from safetensors.torch import load_file

    from atod_edge.models.adapters import adapter_deltas

    adapter = load_file(str(lora_run / ADAPTER_DIR / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)   # the adapter, no base weight
    assert {k.split(".lora_")[0].rsplit(".", 1)[1] for k in adapter} == set(TARGETS)
    base = load_weights(resolve_model("tiny-student"))
    merged = load_weights(lora_run)
    assert merged.keys() == base.keys()   # a plain transformers state dict
    deltas = adapter_deltas(lora_run / ADAPTER_DIR)   # (alpha / r) B A per adapted weight
    assert deltas and all(float(d.abs().max()) > 0 for d in deltas.values())   # the adapters trained
    for key, value in merged.items():
        if key in deltas:   # W + (alpha / r) B A, W itself unchanged
            torch.testing.assert_close(value, base[key] + deltas[key], atol=1e-6, rtol=0)
        else:               # everything else is the start model's, bit for bit
            assert torch.equal(value, base[key]), key


@needs_peft
def test_lora_sft_output_is_a_plain_model_with_the_peft_models_logits(lora_run):
    from peft import PeftModel

    plain, tokenizer = load_model(lora_run)
    assert not any("lora" in k for k in plain.state_dict())
    base, _ = load_model("tiny-student")
    peft_model = PeftModel.from_pretrained(base, str(lora_run / ADAPTER_DIR))
    peft_model.eval()
    adapted = _logits(peft_model, tokenizer)
    merged = _logits(peft_model.merge_and_unload(), tokenizer)
    torch.testing.assert_close(_logits(plain, tokenizer), adapted, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(plain, tokenizer), merged, atol=1e-5, rtol=0)
    start, _ = load_model("tiny-student")
    assert not torch.allclose(_logits(start, tokenizer), adapted, atol=1e-4)   # the adapter mattered


@needs_peft
def test_lora_sft_output_publishes_as_an_adapter_entry(lora_run, tmp_path):
    from atod_edge.evaluate.publish import publish
    from atod_edge.models import zoo

    root = tmp_path / "zoo"
    publish(str(lora_run), "sft-lora", ["atod-edge sft --set lora.rank=4"], episodes=1, max_turns=1, root=root,
            log=lambda *_: None, base="tiny-student")
    card = zoo.read_card("sft-lora", root)
    assert zoo.adapter_base(card)["preset"] == "tiny-student"
    assert set(card["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    merged_dir = zoo.model_dir("sft-lora", root)
    assert not (merged_dir / "config.json").exists()   # the entry holds the adapter only


@needs_peft
def test_resumed_lora_sft_restores_the_adapter_and_matches_the_uninterrupted_run(lora_run, one_thread, tmp_path,
                                                                               monkeypatch):
    from safetensors.torch import load_file

    from atod_edge.train import sft

    out = tmp_path / "model"
    with monkeypatch.context() as patch:
        interrupt_sft_at_step(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            train_sft(_config(out), log=lambda *a: None)
    checkpoint = work_dir(out) / "checkpoints" / "step_000004"
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["step_000004"]
    saved = load_file(str(checkpoint / ADAPTER_DIR / "adapter_model.safetensors"))
    assert (checkpoint / "model.safetensors").is_file()   # the merged plain model beside the adapter

    # full fine-tuning cannot continue a LoRA run
    with pytest.raises(UserError, match="trained with LoRA"):
        train_sft(_config(out, "lora.rank=0"), log=lambda *a: None, resume=True)

    restored = {}
    real_load_adapter = sft.load_adapter

    def recording_load_adapter(adapter, path):
        real_load_adapter(adapter, path)
        restored.update({k: v.detach().clone() for k, v in adapter.named_parameters() if ".lora_" in k})

    monkeypatch.setattr(sft, "load_adapter", recording_load_adapter)
    lines = []
    train_sft(_config(out), log=lines.append, resume=True)
    assert any(f"resuming {work_dir(out)} after step 4" in line for line in lines), lines
    # the adapter at resume is exactly the saved one (peft's saved names drop the adapter name)
    assert len(restored) == len(saved) > 0
    for key, value in restored.items():
        assert torch.equal(value, saved[key.replace(".default.", ".")]), key
    # and the run ends where the uninterrupted one ended (same data order, optimizer state, RNG)
    assert same_weights(load_file(str(out / ADAPTER_DIR / "adapter_model.safetensors")),
                        load_file(str(lora_run / ADAPTER_DIR / "adapter_model.safetensors")))
    assert same_weights(load_weights(out), load_weights(lora_run))


# --------------------------------------------------------------------------------------------
# Demonstrations longer than the model's context


@pytest.fixture(scope="module")
def short_context_model(atod_cache, tmp_path_factory):
    """tiny-student whose config declares a context of 200 positions (household prompts with two
    turns of history are 210-330 tokens)."""
    model, tokenizer = load_model("tiny-student")
    model.config.max_position_embeddings = 200
    path = tmp_path_factory.mktemp("short") / "tiny-200"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_demos_longer_than_the_context_are_cut_or_skipped_and_counted(atod_cache, caplog):
    _, tokenizer = load_model("tiny-student")
    episodes = demo_episodes(SFTConfig(episodes=2))
    instructions = env_class("household").instructions
    whole = build_examples(episodes, tokenizer, instructions, 2)
    assert max(len(p) + len(r) for p, r in whole) > 250   # the case under test occurs

    # 250 positions: every over-long turn can be cut; turns that fit are untouched, a cut one keeps
    # its response and its prompt's end (current observation, admissible actions, assistant header)
    counts = {}
    fitted = build_examples(episodes, tokenizer, instructions, 2, context=250, counts=counts)
    over = [len(p) + len(r) > 250 for p, r in whole]
    assert counts == {"cut": sum(over), "skipped": 0} and len(fitted) == len(whole)
    for (prompt, response), (cut, cut_response), too_long in zip(whole, fitted, over):
        assert len(cut) + len(cut_response) <= 250
        if not too_long:
            assert (cut, cut_response) == (prompt, response)
        else:
            assert cut_response == response and len(cut) < len(prompt) and cut[-20:] == prompt[-20:]

    # 200 positions: some cut, the rest (the fixed part alone is too long) skipped; one warning
    counts = {}
    with caplog.at_level(logging.WARNING, logger="atod_edge.train.demos"):
        fitted = build_examples(episodes, tokenizer, instructions, 2, context=200, counts=counts)
    assert all(len(p) + len(r) <= 200 for p, r in fitted)   # nothing past the position embeddings
    over = sum(len(p) + len(r) > 200 for p, r in whole)
    assert counts["cut"] > 0 and counts["skipped"] > 0 and counts["cut"] + counts["skipped"] == over
    assert len(fitted) == len(whole) - counts["skipped"]
    assert (f"{over} demonstrated turn(s) longer than the model's context (200 tokens): {counts['cut']} prompt(s) "
            f"cut") in caplog.text

    # a context nothing fits in: every turn skipped and counted, never a crash
    counts = {}
    assert build_examples(episodes, tokenizer, instructions, 2, context=40, counts=counts) == []
    assert counts == {"cut": 0, "skipped": len(whole)}


def test_sft_on_a_short_context_model_trains_on_cut_demos(short_context_model, one_thread, tmp_path):
    from atod_edge.scoring import logprobs as scoring
    from atod_edge.scoring import prefix_tree as shared_prefix

    out = tmp_path / "sft"
    cfg = SFTConfig(model=str(short_context_model), demos="expert", episodes=2, epochs=1, batch_size=32,
                    micro_batch=32, eval_episodes=0, out=str(out))
    lines = []
    widths = []

    def recording(forward):
        def wrapped(model, sequences, *args, **kwargs):
            widths.append(max(len(s) for s in sequences))
            return forward(model, sequences, *args, **kwargs)
        return wrapped

    def recording_per_turn(forward):
        def wrapped(model, prompts, responses, *args, **kwargs):
            widths.append(max(len(p) + len(r) for p, r in zip(prompts, responses)))
            return forward(model, prompts, responses, *args, **kwargs)
        return wrapped

    with pytest.MonkeyPatch.context() as patch:   # whichever forward the step takes
        patch.setattr(shared_prefix, "shared_prefix_logprobs", recording(shared_prefix.shared_prefix_logprobs))
        patch.setattr(scoring, "response_logprobs", recording_per_turn(scoring.response_logprobs))
        train_sft(cfg, log=lines.append)
    assert widths and max(widths) <= 200   # every training sequence fits the context
    data = json.loads((work_dir(out) / "data.json").read_text())
    assert data["cut_to_context"] > 0 and data["examples"] > 0
    assert data["examples"] + data["skipped_over_context"] == 17   # the 2 expert demos' 17 turns
    assert any("cut to the model's context" in line for line in lines), lines
    assert load_model(out)[0].config.max_position_embeddings == 200
