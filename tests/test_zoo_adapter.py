"""Adapter-only zoo entries (atod_edge/models/adapters.py): a LoRA adapter published over a named
base preset, loaded by name (base built, its sha256 checked against the card, adapter merged and the
merge cached), refused in one line over other base weights or with a tampered adapter file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from atod_edge.errors import UserError  # noqa: E402
from atod_edge.evaluate.publish import publish  # noqa: E402
from atod_edge.io import cache_dir, file_sha256  # noqa: E402
from atod_edge.models import adapters, zoo  # noqa: E402
from atod_edge.models.loading import load_model  # noqa: E402
from atod_edge.models.presets import resolve_model  # noqa: E402

NAME = "tiny-adapter"
TEXT = "You are in the kitchen. go to fridge 1"


def _logits(model, tokenizer):
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_checkpoint(atod_cache, tmp_path_factory):
    """A LoRA checkpoint as lora training saves it (CHECKPOINT/adapter/, peft's layout) over
    tiny-student, with random non-zero B, and the peft model's logits on TEXT."""
    from atod_edge.train.lora import ADAPTER_DIR, add_adapters, save_adapter

    model, tokenizer = load_model("tiny-student")
    wrapped = add_adapters(model, rank=4, alpha=8, dropout=0.0,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, param in wrapped.named_parameters():
            if "lora_B" in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    wrapped.eval()
    checkpoint = tmp_path_factory.mktemp("lora") / "step_000010"
    save_adapter(wrapped, checkpoint / ADAPTER_DIR)
    return checkpoint, _logits(wrapped, tokenizer)


@pytest.fixture(scope="module")
def adapter_zoo(lora_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    publish(str(lora_checkpoint[0]), NAME, ["atod-edge sft --model tiny-student --set lora.rank=4"], episodes=2,
            max_turns=2, root=root, log=lambda *_: None, base="tiny-student")
    return root


def _cli(args, root, **env):
    environ = dict(os.environ, ATOD_EDGE_ZOO=str(root), **env)
    return subprocess.run([sys.executable, "-m", "atod_edge.cli", *args], capture_output=True, text=True,
                          env=environ, timeout=300)


def test_entry_stores_only_the_adapter_and_names_its_base(adapter_zoo):
    entry = adapter_zoo / NAME
    assert {p.name for p in entry.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                  zoo.CARD_JSON, zoo.CARD_MD}
    card = zoo.read_card(NAME, adapter_zoo)
    base_weights = resolve_model("tiny-student") / "model.safetensors"
    assert card["base"]["preset"] == "tiny-student"
    assert card["base"]["sha256"] == {"model.safetensors": file_sha256(base_weights)}
    assert card["base"]["atod_edge"] and card["adapter"]["r"] == 4
    stored = sum(p.stat().st_size for p in entry.iterdir() if p.name.startswith("adapter_"))
    assert stored == sum(v["bytes"] for v in card["files"].values())
    assert stored < base_weights.stat().st_size / 10   # the adapter, not the model
    assert set(card["evaluation"]) >= {"eval", "unseen"}
    assert "adapter over tiny-student" in zoo.summary_line(card)
    assert file_sha256(base_weights) in (entry / zoo.CARD_MD).read_text()


def test_load_by_name_merges_into_the_base_and_matches_the_peft_model(adapter_zoo, lora_checkpoint,
                                                                      monkeypatch):
    monkeypatch.setattr(zoo, "ZOO_ROOT", adapter_zoo)
    merged = resolve_model(NAME)
    assert merged.parent == cache_dir() / "zoo-merged"
    model, tokenizer = load_model(NAME)
    assert torch.allclose(_logits(model, tokenizer), lora_checkpoint[1], atol=1e-5, rtol=0)
    base, _ = load_model("tiny-student")
    assert not torch.allclose(_logits(base, tokenizer), lora_checkpoint[1], atol=1e-3)   # the adapter mattered

    def no_second_merge(*args, **kwargs):
        raise AssertionError("merged again")

    monkeypatch.setattr(adapters, "merge_adapter", no_second_merge)
    assert resolve_model(NAME) == merged
    key = zoo.weights_sha256(NAME, adapter_zoo)   # what derived caches (the default job's) key on
    assert len(key) == 64 and merged.name == f"{NAME}-{key[:16]}"


def test_other_base_weights_are_refused_in_one_line(adapter_zoo, atod_cache, tmp_path):
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    shutil.copytree(atod_cache / "models" / "tiny-student", cache / "models" / "tiny-student")
    weights = cache / "models" / "tiny-student" / "model.safetensors"
    expected = file_sha256(weights)
    tensors = load_file(str(weights))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 0.01   # one tensor changed
    save_file(tensors, str(weights), metadata={"format": "pt"})
    done = _cli(["models", "info", NAME], adapter_zoo, ATOD_EDGE_CACHE=str(cache))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "tiny-student" in lines[0] and expected in lines[0] and file_sha256(weights) in lines[0]


def test_a_tampered_adapter_file_is_refused_in_one_line(adapter_zoo, tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(adapter_zoo, root)
    weights = root / NAME / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x01\x02\x03\x04"
    weights.write_bytes(bytes(data))
    done = _cli(["models", "info", NAME], root)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "adapter_model.safetensors is corrupt" in lines[0], done.stderr
    with pytest.raises(UserError, match="adapter_model.safetensors is corrupt"):
        zoo.model_dir(NAME, root)


def test_a_card_naming_other_base_weights_is_refused(adapter_zoo, tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    shutil.copytree(adapter_zoo, root)
    card_path = root / NAME / zoo.CARD_JSON
    card = json.loads(card_path.read_text())
    card["base"]["sha256"]["model.safetensors"] = "0" * 64
    card_path.write_text(json.dumps(card))
    monkeypatch.setattr(zoo, "ZOO_ROOT", root)
    with pytest.raises(UserError, match=r"adapter over 'tiny-student'.*the card says 0{64}"):
        resolve_model(NAME)


def test_cli_lists_info_and_publishes_adapter_entries(adapter_zoo, lora_checkpoint, tmp_path):
    done = _cli(["models", "list"], adapter_zoo)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith(NAME))
    success = zoo.read_card(NAME, adapter_zoo)["evaluation"]["eval"]["success"]
    assert "adapter over tiny-student" in row and f"eval {success:.1%}" in row
    done = _cli(["models", "info", NAME], adapter_zoo)
    assert done.returncode == 0, done.stderr
    assert "LoRA adapter only, over the preset `tiny-student`" in done.stdout
    chain = tmp_path / "chain.txt"
    chain.write_text("atod-edge sft --model tiny-student --set lora.rank=4\n")
    root = tmp_path / "zoo"
    done = _cli(["models", "publish", str(lora_checkpoint[0]), "--name", "cli-adapter", "--chain", str(chain),
                 "--adapter", "--base", "tiny-student", "--dtype", "float16", "--episodes", "1",
                 "--zoo", str(root)], root)
    assert done.returncode == 0, done.stderr
    card = zoo.read_card("cli-adapter", root)
    assert card["storage_dtype"].startswith("float16") and card["base"]["preset"] == "tiny-student"
    done = _cli(["models", "publish", str(lora_checkpoint[0]), "--name", "x", "--chain", str(chain),
                 "--adapter", "--zoo", str(root)], root)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_checkpoint_trained_on_another_base_is_refused(lora_checkpoint, tmp_path):
    """The LoRA checkpoint also holds its merged model: one of its non-adapted weights differs
    from this machine's base, so the adapter was trained on another base."""
    from safetensors.torch import load_file, save_file

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(lora_checkpoint[0], checkpoint)
    tensors = load_file(str(resolve_model("tiny-student") / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] * 1.5
    save_file(tensors, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="not trained on this machine's 'tiny-student'.*embed_tokens"):
        publish(str(checkpoint), "other", ["x"], episodes=1, max_turns=1, root=tmp_path / "zoo",
                log=lambda *_: None, base="tiny-student")
