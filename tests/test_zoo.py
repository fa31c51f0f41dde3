"""The model zoo (atod_edge/zoo): publishing a checkpoint with its card, loading by name, refusing
files that do not match their card, and the household teacher that ships in the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from atod_edge.models import zoo
from atod_edge.errors import UserError
from atod_edge.evaluate.publish import publish
from atod_edge.io import file_sha256
from atod_edge.models.loading import load_model
from atod_edge.models.presets import resolve_model


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """tiny-student published into a scratch zoo (2 episodes per split: the mechanism, not a score)."""
    root = tmp_path_factory.mktemp("zoo")
    publish("tiny-student", "scratch-student", ["atod-edge models list"], episodes=2,
            max_turns=2, root=root, log=lambda *_: None)
    return root


def test_publish_writes_fp16_weights_and_a_card_that_matches_them(published):
    entry = published / "scratch-student"
    card = zoo.read_card("scratch-student", published)
    assert card["chain"] == ["atod-edge models list"]
    assert card["storage_dtype"] == "float16"
    assert set(card["evaluation"]) >= {"eval", "unseen"}
    assert card["evaluation"]["eval"]["episodes"] == 2
    assert card["files"]["model.safetensors"]["sha256"] == file_sha256(entry / "model.safetensors")
    assert "tokenizer.json" in card["files"]
    from safetensors import safe_open

    with safe_open(entry / "model.safetensors", framework="pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
    text = (entry / zoo.CARD_MD).read_text()
    assert "atod-edge models list" in text and card["files"]["model.safetensors"]["sha256"] in text


def test_zoo_model_loads_upcast_to_fp32(published):
    import torch

    model, _ = load_model(zoo.model_dir("scratch-student", published))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_publish_in_float32_keeps_the_weights_bit_exact(tmp_path):
    import torch

    publish("tiny-student", "exact-student", ["atod-edge models list"], episodes=1, max_turns=1,
            root=tmp_path, dtype="float32", log=lambda *_: None)
    assert zoo.read_card("exact-student", tmp_path)["storage_dtype"] == "float32"
    stored, _ = load_model(zoo.model_dir("exact-student", tmp_path))
    source, _ = load_model("tiny-student")
    pairs = list(zip(stored.state_dict().items(), source.state_dict().items()))
    assert pairs and all(a == b and torch.equal(x, y) for (a, x), (b, y) in pairs)
    with pytest.raises(UserError, match="storage dtype 'int8'"):
        publish("tiny-student", "bad-dtype", ["x"], episodes=1, root=tmp_path, dtype="int8")


def test_publish_with_a_bf16_evaluation_says_so_in_its_card_and_keeps_the_episodes(tmp_path):
    from atod_edge.rollout.episode import read_episodes

    publish("tiny-student", "bf16-eval", ["atod-edge models list"], episodes=2, max_turns=2,
            root=tmp_path, precision="bf16", log=lambda *_: None, episodes_out=tmp_path / "episodes")
    card = zoo.read_card("bf16-eval", tmp_path)
    for split in ("eval", "unseen"):
        kept, _ = read_episodes(tmp_path / "episodes" / split / "episodes.jsonl")
        report = json.loads((tmp_path / "episodes" / split / "report.json").read_text())
        assert len(kept) == 2 and report["success"] == card["evaluation"][split]["success"]
    assert card["evaluation"]["precision"] == "bf16" and card["evaluation"]["eval"]["episodes"] == 2
    assert all(command.endswith("--set precision=bf16") for command in card["eval_command"])
    assert "decoded with bf16 weights" in (tmp_path / "bf16-eval" / zoo.CARD_MD).read_text()
    with pytest.raises(UserError, match="precision"):
        publish("tiny-student", "bad-precision", ["x"], episodes=1, root=tmp_path, precision="int8")


def _copy(published, tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(published, root)
    return root


def test_corrupt_weights_are_refused_naming_the_file(published, tmp_path):
    root = _copy(published, tmp_path)
    weights = root / "scratch-student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:48] = b"\x00" * 40  # damage the header, as a torn download would
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.safetensors is corrupt \(sha256"):
        zoo.model_dir("scratch-student", root)


def test_truncated_and_missing_files_are_refused(published, tmp_path):
    root = _copy(published, tmp_path)
    weights = root / "scratch-student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"model\.safetensors is truncated or corrupt \(1000 bytes"):
        zoo.model_dir("scratch-student", root)
    weights.unlink()
    with pytest.raises(UserError, match=r"model\.safetensors is missing"):
        zoo.model_dir("scratch-student", root)


def test_cli_refuses_a_corrupt_zoo_model_in_one_line(published, tmp_path):
    root = _copy(published, tmp_path)
    weights = root / "scratch-student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    env = dict(os.environ, ATOD_EDGE_ZOO=str(root))
    done = subprocess.run([sys.executable, "-m", "atod_edge.cli", "models", "info", "scratch-student"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors is truncated or corrupt" in lines[0], done.stderr


def test_unknown_name_lists_the_zoo():
    with pytest.raises(UserError, match="not a zoo model"):
        resolve_model("no-such-model-anywhere")


# --------------------------------------------------------------------------------------------
# The models that ship in the package


@pytest.mark.parametrize("name", zoo.names())
def test_shipped_zoo_model_matches_its_card(name):
    card = zoo.read_card(name)
    directory = zoo.model_dir(name)  # raises if any file differs from its recorded sha256
    assert sum(v["bytes"] for v in card["files"].values()) <= 12.5 * 2**20
    for split in ("eval", "unseen"):
        assert card["evaluation"][split]["episodes"] >= 300
    assert card["evaluation"]["temperature"] == 0.4
    assert card["chain"] and card["versions"]["torch"]
    _check_entry_files(card, directory)


def _check_entry_files(card: dict, directory) -> None:
    """A full entry is a transformers checkpoint; an adapter-only one (models/adapters.py) holds
    the adapter's files, no config of its own, and names its base (preset, weights sha256)."""
    base = zoo.adapter_base(card)
    if base is None:
        assert json.loads((directory / "config.json").read_text())["vocab_size"] > 0
        return
    from atod_edge.models import adapters

    assert set(adapters.ADAPTER_FILES) <= set(card["files"])
    assert not (directory / "config.json").exists()   # the base's config comes from the preset
    assert adapters.adapter_settings(directory)["r"] > 0
    assert adapters.adapter_deltas(directory)   # LoRA A/B pairs only, every one complete
    assert base["preset"] and base["sha256"] and all(len(v) == 64 for v in base["sha256"].values())


def test_entry_file_check_takes_full_and_adapter_only_entries(published, tmp_path):
    """The shipped-zoo check above, on a full entry and on an adapter-only one (which has no
    config.json): each passes, and each fails when its own files are wrong."""
    pytest.importorskip("peft")   # making the adapter needs it; loading one does not
    from atod_edge.train.lora import ADAPTER_DIR, add_adapters, save_adapter

    _check_entry_files(zoo.read_card("scratch-student", published), zoo.model_dir("scratch-student", published))
    model, _ = load_model("tiny-student")
    checkpoint = tmp_path / "lora"
    save_adapter(add_adapters(model, 4, 8.0, 0.0, ["q_proj"]), checkpoint / ADAPTER_DIR)
    root = tmp_path / "zoo"
    publish(str(checkpoint), "scratch-adapter", ["atod-edge sft --set lora.rank=4"], episodes=1, max_turns=1,
            root=root, log=lambda *_: None, base="tiny-student")
    card, directory = zoo.read_card("scratch-adapter", root), zoo.model_dir("scratch-adapter", root)
    _check_entry_files(card, directory)
    (directory / "config.json").write_text("{}")   # a full entry's file in an adapter entry
    with pytest.raises(AssertionError):
        _check_entry_files(card, directory)
    (directory / "config.json").unlink()
    card["base"]["sha256"] = {}
    with pytest.raises(AssertionError):
        _check_entry_files(card, directory)
    full = zoo.read_card("scratch-student", published)
    with pytest.raises(FileNotFoundError):   # a full entry without config.json is no checkpoint
        _check_entry_files(full, tmp_path)


def test_household_teacher_is_listed_with_its_measured_success(capsys):
    if "household-teacher" not in zoo.names():
        pytest.fail("the zoo has no household-teacher (the default job's teacher)")
    from atod_edge.cli.main import main

    assert main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("household-teacher"))
    success = zoo.read_card("household-teacher")["evaluation"]["eval"]["success"]
    assert f"eval {success:.1%}" in row and success >= 0.60
