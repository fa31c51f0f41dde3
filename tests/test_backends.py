"""ONNX Runtime and llama.cpp policies against the PyTorch student (tiny-student preset):
greedy tokens and log-probs match, batching and seeds behave, load_policy dispatches by file
kind, and the rollout engine runs episodes with each backend."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("optimum.exporters.onnx")
try:
    import llama_cpp  # noqa: F401
except ImportError:  # CI installs it; a local venv may still be building it
    pytest.skip("llama-cpp-python is not importable (pip install llama-cpp-python==0.3.36)",
                allow_module_level=True)

from atod_edge.engine.backends import load_policy
from atod_edge.engine.backends.llamacpp import LlamaCppPolicy
from atod_edge.engine.backends.ort import OrtPolicy
from atod_edge.errors import UserError
from atod_edge.engine.sampling import SamplingParams
from atod_edge.engine.policy import TorchPolicy
from atod_edge.prompts import build_messages, encode_prompt

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, stop=())


@pytest.fixture(scope="module")
def files(tmp_path_factory, atod_cache):
    from atod_edge.export import export_model

    out = tmp_path_factory.mktemp("backends")
    export_model("tiny-student", out, onnx=True, int8=False, gguf_quants=["f32", "q8_0"], verify=False)
    return out


@pytest.fixture(scope="module")
def student(atod_cache):
    return TorchPolicy.load("tiny-student")


@pytest.fixture(scope="module")
def prompts(student):
    tok = student.tokenizer
    tasks = ["Your task is to: put a clean mug in the cabinet.", "Your task is to: find the key.",
             "You are in the middle of a room. Looking around, you see a fridge 1 and a drawer 2. "
             "Your task is to: heat an apple and put it on the table."]
    return [encode_prompt(tok, build_messages("Act in a house.", t, [], None, ["look", "go to fridge 1"]))
            for t in tasks]


def _assert_matches_torch(reference, generated, logprob_tol):
    for ref, got in zip(reference, generated):
        assert got.token_ids == ref.token_ids
        assert max(abs(a - b) for a, b in zip(ref.logprobs, got.logprobs)) < logprob_tol
        assert got.text == ref.text and got.finish_reason == ref.finish_reason


def test_ort_batched_greedy_matches_torch(files, student, prompts):
    policy = load_policy(str(files / "onnx"))
    assert isinstance(policy, OrtPolicy)
    assert policy.providers[-1] == "CPUExecutionProvider"
    reference = student.generate(prompts, GREEDY)
    _assert_matches_torch(reference, policy.generate(prompts, GREEDY), 1e-4)
    # left padding must not leak: one prompt alone gives what it gave inside the batch
    _assert_matches_torch(reference[2:], policy.generate(prompts[2:], GREEDY), 1e-4)


def test_ort_sampling_is_seeded_and_logprobs_are_the_models(files, prompts):
    policy = load_policy(str(files / "onnx" / "model.onnx"))
    sampling = SamplingParams(max_new_tokens=10, temperature=1.0, stop=())
    first = policy.generate(prompts, sampling, seed=7)
    assert [g.token_ids for g in first] == [g.token_ids for g in policy.generate(prompts, sampling, seed=7)]
    assert [g.token_ids for g in first] != [g.token_ids for g in policy.generate(prompts, sampling, seed=8)]
    # the recorded log-prob of a sampled token is the model's own (temperature 1) log-prob
    import numpy as np
    import torch

    gen = first[0]
    logits = policy.logits(list(prompts[0]) + gen.token_ids[:-1])[len(prompts[0]) - 1:]
    expected = torch.log_softmax(torch.from_numpy(logits), -1)[torch.arange(len(gen.token_ids)), gen.token_ids]
    assert np.allclose(expected.numpy(), gen.logprobs, atol=1e-5)


def test_llamacpp_f32_greedy_matches_torch(files, student, prompts):
    policy = load_policy(str(files / "agent.f32.gguf"))
    assert isinstance(policy, LlamaCppPolicy)
    reference = student.generate(prompts, GREEDY)
    _assert_matches_torch(reference, policy.generate(prompts, GREEDY), 1e-4)
    cached = LlamaCppPolicy.load(str(files / "agent.f32.gguf"), prefix_cache=True)
    _assert_matches_torch(reference, cached.generate(prompts + prompts[:1], GREEDY)[:3], 1e-4)


def test_llamacpp_quantized_generates_valid_tokens(files, prompts):
    policy = load_policy(str(files / "agent.q8_0.gguf"))
    out = policy.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0), seed=3)
    vocab = len(policy.tokenizer)
    for gen in out:
        assert 1 <= len(gen.token_ids) <= 16 and all(0 <= t < vocab for t in gen.token_ids)
        assert all(lp <= 0.0 for lp in gen.logprobs)
        assert gen.finish_reason in ("stop", "length")


def test_load_policy_dispatch_and_errors(files, tmp_path):
    assert isinstance(load_policy(str(files / "onnx")), OrtPolicy)
    assert isinstance(load_policy("tiny-student"), TorchPolicy)
    lonely = tmp_path / "agent.gguf"
    lonely.write_bytes((files / "agent.q8_0.gguf").read_bytes())
    with pytest.raises(UserError, match="no Hugging Face tokenizer"):
        load_policy(str(lonely))
    with pytest.raises(UserError, match="no GGUF file"):
        load_policy(str(tmp_path / "missing.gguf"))


def test_a_truncated_gguf_is_refused_in_one_line_naming_the_file(files, tmp_path, capsys):
    import shutil

    from atod_edge.cli.main import main

    for tokenizer_file in (f for f in files.iterdir() if f.is_file() and f.suffix != ".gguf"):
        shutil.copy(tokenizer_file, tmp_path)
    torn = tmp_path / "agent.q8_0.gguf"
    torn.write_bytes((files / "agent.q8_0.gguf").read_bytes()[:900_000])   # a download cut short
    with pytest.raises(UserError, match="not a readable GGUF file"):
        load_policy(str(torn))
    assert main(["eval", "--model", str(torn), "--env", "household", "--episodes", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"{torn} is not a readable GGUF file (truncated or damaged?" in err[0]


@pytest.mark.parametrize("name", ["onnx", "agent.q8_0.gguf"])
def test_rollout_engine_runs_episodes_with_exported_backends(files, name):
    from atod_edge.envs import make_env
    from atod_edge.rollout.runner import run_episodes

    policy = load_policy(str(files / name))
    tasks = make_env("household").tasks("eval", 2)
    episodes = run_episodes(policy, "household", tasks, max_turns=2,
                            sampling=SamplingParams(max_new_tokens=16, temperature=0.0))
    assert len(episodes) == 2
    for episode in episodes:
        assert 1 <= len(episode.turns) <= 2
        turn = episode.turns[0]
        assert turn.prompt_ids and turn.response_ids and len(turn.student_logprobs) == len(turn.response_ids)
