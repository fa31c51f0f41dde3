"""The GGUF teacher (atod_edge/backends/llamacpp_teacher.py, atod_edge/teacher.py): a small teacher
exported to f32 GGUF scores the student's recorded episodes like the torch teacher (within 1e-4),
refuses a student with another tokenizer, and trains a short ATOD run (adaptive schedule)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("gguf")
try:
    import llama_cpp  # noqa: F401
except ImportError:  # CI installs it; a local venv may still be building it
    pytest.skip("llama-cpp-python is not importable (pip install llama-cpp-python==0.3.36)",
                allow_module_level=True)

from atod_edge.errors import UserError


@pytest.fixture(scope="module")
def gguf_teacher(small_teacher, tmp_path_factory):
    """small_teacher (tiny-student's first layer, the student's tokenizer) as an f32 GGUF."""
    from atod_edge.export.gguf import write_gguf

    return write_gguf(small_teacher, tmp_path_factory.mktemp("gguf-teacher") / "teacher.f32.gguf", "f32")


@pytest.fixture(scope="module")
def recorded(student_policy):
    """The student's episodes on two household tasks, two rollouts each (a GRPO group shares its
    first prompt, the turns of a task their system prompt and task text)."""
    from atod_edge.envs import env_class
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.rollout.runner import run_episodes

    env_cls = env_class("household")
    return run_episodes(student_policy, env_cls, env_cls().tasks("train", 2), group_size=2,
                        sampling=SamplingParams(max_new_tokens=8, temperature=1.0), seed=3, max_turns=3)


def _copy(episodes):
    from atod_edge.rollout.episode import Episode

    return [Episode.from_dict(ep.to_dict()) for ep in episodes]


def test_gguf_teacher_matches_the_torch_teacher_on_recorded_episodes(gguf_teacher, small_teacher, recorded,
                                                                     tiny_student):
    from atod_edge.scoring.teacher import load_teacher, score_episodes

    _, tokenizer = tiny_student
    by_torch, by_gguf = _copy(recorded), _copy(recorded)
    score_episodes(load_teacher(str(small_teacher), "cpu", tokenizer), by_torch, pad_id=0, micro_batch=16)
    teacher = load_teacher(str(gguf_teacher), "cpu", tokenizer, n_threads=1)
    try:
        score_episodes(teacher, by_gguf, pad_id=0, micro_batch=16)
        stats = dict(teacher.stats)
    finally:
        teacher.close()
    pairs = [(a, b) for ea, eb in zip(by_torch, by_gguf) for a, b in zip(ea.turns, eb.turns)]
    assert len(pairs) >= 8
    worst = 0.0
    for torch_turn, gguf_turn in pairs:
        assert len(gguf_turn.teacher_logprobs) == len(torch_turn.teacher_logprobs) == len(torch_turn.response_ids)
        worst = max(worst, *(abs(x - y) for x, y in zip(torch_turn.teacher_logprobs, gguf_turn.teacher_logprobs)))
    assert worst < 1e-4
    # the teacher is not the student: it scores the student's tokens differently
    assert any(abs(t - s) > 1e-2 for turn, _ in pairs for t, s in zip(turn.teacher_logprobs, turn.student_logprobs))
    # prefix reuse: the group's identical first prompts and the shared task text came from the cache
    assert stats["reused"] > stats["evaluated"] / 2
    assert stats["tokens"] == stats["reused"] + stats["evaluated"] + len(pairs)   # last tokens need no logits


def test_gguf_teacher_refuses_another_tokenizer(gguf_teacher, tiny_student, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from atod_edge.scoring.llamacpp_teacher import LlamaCppTeacher

    _, student_tokenizer = tiny_student
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["a different corpus entirely"] * 3,
                            trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=student_tokenizer.eos_token)
    with pytest.raises(UserError, match="tokenizers differ: token"):
        LlamaCppTeacher.load(gguf_teacher, student_tokenizer=other, n_threads=1)
    with pytest.raises(UserError, match="no GGUF teacher"):
        LlamaCppTeacher.load(tmp_path / "missing.gguf")


# 3 steps of 1 household task x 2 rollouts x 2 turns x 6 tokens (tests/train/train_fixtures.TINY_RUN)
TINY_RUN = ["steps=3", "tasks_per_step=1", "group_size=2", "max_turns=2", "max_new_tokens=6", "lr=1e-3",
            "eval_episodes=0", "sample_episodes=2", "checkpoint_every=3", "compare=false",
            "schedule.anneal_steps=2"]


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_short_atod_run_with_the_gguf_teacher_and_the_adaptive_schedule_trains(gguf_teacher, atod_cache, tmp_path):
    import torch

    from atod_edge.config import load_config
    from atod_edge.rollout.episode import read_episodes
    from atod_edge.io import read_jsonl
    from atod_edge.models.presets import resolve_model
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.trainer import train

    cfg = load_config(TrainConfig, None, TINY_RUN + ["schedule.shape=adaptive", "schedule.signal=disagreement",
                                                     "schedule.smoothing=0", "schedule.plateau_tol=1"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        final = train(cfg, tmp_path / "run", "tiny-student", str(gguf_teacher), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")[0] if "loss" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    # tol = 1: every step from the second on counts; p(2) = n(2) / T = 1 / 2
    assert [r["schedule_progress"] for r in rows] == [0.0, 0.0, 0.5]
    assert [r["kappa"] for r in rows] == [1.0, 1.0, pytest.approx(0.55)]
    for row in rows:
        assert math.isfinite(row["loss"]) and row["mean_abs_log_ratio"] > 0 and row["tokens"] > 0
    episodes, _ = read_episodes(tmp_path / "run" / "samples" / "step_000002.jsonl")
    assert episodes and all(t.teacher_logprobs and len(t.teacher_logprobs) == len(t.response_ids)
                            for ep in episodes for t in ep.turns)
    before, after = _weights(resolve_model("tiny-student")), _weights(final)
    assert any(not torch.equal(before[k], after[k]) for k in before)
