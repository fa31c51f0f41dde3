"""Tests for train/precision.py and the GPU-path numerics around it (issue 16): fp32 master weights
from a bf16 checkpoint under bf16 compute, old log-probs recomputed with the update's forward,
the chunked sampled-token log-probs (values, gradients, peak memory), truncated responses, and
the refusal of tempered training rollouts. CPU only: bf16 autocast runs on CPU too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import load_weights, metric_rows, overrides

from atod_edge.cli import main as cli
from atod_edge.config import load_config
from atod_edge.rollout.episode import SCHEMA_VERSION, Episode, Turn, read_episodes, write_episodes
from atod_edge.errors import ConfigError
from atod_edge.scoring.tokens import sampled_logprobs
from atod_edge.train.config import TrainConfig
from atod_edge.train.precision import compute_precision, fsdp_mixed_precision, logprob_mismatch, recomputes_old_logprobs, truncated_is_weights
from atod_edge.train.batch import TokenBatch, build_batch, micro_batch_token_index
from atod_edge.train.distributed import DistInfo
from atod_edge.train.trainer import train
from atod_edge.train.update import recompute_old_logprobs, update

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, list(extra))


# --- 1. fp32 master weights ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_student(atod_cache, tmp_path_factory) -> Path:
    """tiny-student saved in bf16, as Qwen checkpoints come."""
    from atod_edge.models.loading import load_model

    model, tokenizer = load_model("tiny-student")
    path = tmp_path_factory.mktemp("bf16") / "student"
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_bf16_checkpoint_trains_in_fp32_master_weights_under_bf16_compute(bf16_student, small_teacher,
                                                                           one_thread, tmp_path):
    cfg = load_config(TrainConfig, None, overrides(steps=1, lr=1e-6, warmup_steps=0, algo="opd", precision="bf16"))
    final = train(cfg, tmp_path / "run", str(bf16_student), str(small_teacher), log=lambda *a: None)
    before, after = load_weights(bf16_student), load_weights(final)
    assert {t.dtype for t in before.values()} == {torch.bfloat16}
    assert {t.dtype for t in after.values()} == {torch.float32}
    # one AdamW step at lr 1e-6 moves nearly every element (in bf16 almost all would round away)
    changed = sum(int((after[k] != before[k].float()).sum()) for k in before)
    assert changed / sum(t.numel() for t in before.values()) > 0.9
    row = metric_rows(tmp_path / "run")[0]
    # bf16 compute: lp_S recomputed by the update's forward (auto), so the first ratio is exactly 1,
    # while the rollout's cached bf16 decode gave other log-probs (the mismatch, logged)
    assert row["mean_ratio"] == pytest.approx(1.0, abs=1e-6) and row["clip_fraction"] == 0.0
    assert 0.0 < row["rollout_mismatch_mean"] <= row["rollout_mismatch_max"] < 1.0


def test_compute_precision_and_when_old_logprobs_are_recomputed():
    assert compute_precision("auto", "cuda:1") == "bf16" and compute_precision("auto", "cpu") == "fp32"
    assert compute_precision("bf16", "cpu") == "bf16" and compute_precision("fp32", "cuda") == "fp32"
    assert recomputes_old_logprobs("auto", "bf16") and not recomputes_old_logprobs("auto", "fp32")
    assert recomputes_old_logprobs("always", "fp32") and not recomputes_old_logprobs("never", "bf16")
    mixed = fsdp_mixed_precision("bf16")
    assert (mixed.param_dtype, mixed.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp_mixed_precision("fp32") is None
    with pytest.raises(ConfigError, match="precision"):
        _cfg("precision=fp16")


# --- 2. old log-probs, mismatch, truncated importance sampling ----------------------------------

def test_recomputed_old_logprobs_equal_the_rollouts_in_fp32_not_in_bf16(tiny_student, one_thread):
    from atod_edge.envs import env_class
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.rollout.runner import run_episodes

    model, tokenizer = tiny_student
    env_cls = env_class("household")
    tasks = env_cls().tasks("train", 2)
    cfg = _cfg("micro_batch=3")
    gaps = {}
    for precision in ("fp32", "bf16"):
        episodes = run_episodes(TorchPolicy(model, tokenizer, precision=precision), env_cls, tasks, group_size=2,
                                sampling=SamplingParams(max_new_tokens=8), seed=3, max_turns=2)
        rollout = recompute_old_logprobs(model, episodes, cfg, DistInfo(), tokenizer.pad_token_id,
                                         precision=precision)
        recomputed = torch.tensor([lp for ep in episodes for t in ep.turns for lp in t.student_logprobs])
        assert rollout.shape == recomputed.shape and len(rollout) == sum(len(t.response_ids)
                                                                         for ep in episodes for t in ep.turns)
        gaps[precision] = float((recomputed - rollout).abs().max())
    assert gaps["fp32"] < 1e-5
    assert gaps["bf16"] > 10 * max(gaps["fp32"], 1e-6)   # what the recompute is for


def test_truncated_importance_weights_and_mismatch_by_hand():
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    rollout = torch.tensor([-1.0, -1.5, -1.5, -3.1])
    weights, truncated = truncated_is_weights(old, rollout, cap=2.0)
    # exp(old - rollout): 1, e^-0.5, e^1 (capped at 2), e^0.1
    assert weights.tolist() == pytest.approx([1.0, 0.6065307, 2.0, 1.1051709])
    assert truncated == 0.25
    assert truncated_is_weights(old, rollout, cap=0.0)[0].tolist() == [1.0] * 4
    stats = logprob_mismatch(old, rollout)
    assert stats["rollout_mismatch_mean"] == pytest.approx((0 + 0.5 + 1.0 + 0.1) / 4)
    assert stats["rollout_mismatch_max"] == pytest.approx(1.0)
    assert stats["rollout_mismatch_bias"] == pytest.approx((0 - 0.5 + 1.0 + 0.1) / 4)
    with pytest.raises(ConfigError, match="tis_cap"):
        _cfg("tis_cap=2", "recompute_old_logprobs=never")


def test_loss_weights_scale_each_tokens_loss(tiny_student, one_thread):
    from copy import deepcopy

    from atod_edge.scoring.logprobs import response_logprobs

    model, tokenizer = tiny_student
    prompt = tokenizer("Goal: put the apple in the fridge.")["input_ids"]
    responses = [tokenizer("<action>open fridge 1</action>")["input_ids"], tokenizer("<action>look</action>")["input_ids"]]
    with torch.no_grad():
        old = torch.cat(response_logprobs(model, [prompt, prompt], responses))
    n = [len(r) for r in responses]
    advantages = torch.cat([torch.full((n[0],), 1.0), torch.full((n[1],), -1.0)])
    losses = {}
    for scale in (1.0, 0.5):
        batch = TokenBatch([prompt, prompt], responses, [0, n[0]], old, advantages, {},
                           loss_weights=torch.full_like(old, scale))
        student = deepcopy(model)
        stats = update(student, torch.optim.AdamW(student.parameters(), lr=1e-4), batch, _cfg("micro_batch=1"),
                       DistInfo(), pad_id=tokenizer.pad_token_id)
        losses[scale] = stats["loss"]
        assert stats["rollout_mismatch_max"] < 1e-5   # no recompute: old is the same forward's
    assert losses[0.5] == pytest.approx(losses[1.0] / 2, rel=1e-5) and losses[1.0] != 0.0


def test_micro_batch_token_positions_follow_the_order():
    batch = TokenBatch([[1], [1], [1]], [[5, 6], [7], [8, 9, 10]], [0, 2, 3], torch.zeros(6), torch.zeros(6), {})
    index = micro_batch_token_index(batch, [2, 0, 1], micro_batch=2, device="cpu")
    assert [t.tolist() for t in index] == [[3, 4, 5, 0, 1], [2]]


# --- 3. chunked sampled-token log-probs ---------------------------------------------------------

def test_chunked_logprobs_equal_the_full_log_softmax_with_their_gradients():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=generator, requires_grad=True)
    head = torch.nn.Linear(32, 3000, bias=False)
    targets = torch.randint(0, 3000, (300,), generator=generator)
    # the truth in float64: the fp32 paths must agree with it to a few fp32 ulps (|lp| ~ 8 here)
    hidden64, weight64 = hidden.detach().double().requires_grad_(), head.weight.detach().double().requires_grad_()
    full_logp = torch.log_softmax(hidden64 @ weight64.T, dim=-1)
    full = full_logp.gather(-1, targets[:, None]).squeeze(-1)
    full_entropy = -(full_logp.exp() * full_logp).sum(-1)
    expected = torch.autograd.grad(full.sum(), [hidden64, weight64], retain_graph=True)
    for chunk in (1, 7, 128, 1000):
        lp, entropy = sampled_logprobs(hidden, targets, head=head, chunk_tokens=chunk, entropy=True)
        assert lp.dtype == torch.float32
        assert float((lp.double() - full).detach().abs().max()) <= 4e-6
        assert float((entropy.double() - full_entropy).detach().abs().max()) <= 1e-5
        grads = torch.autograd.grad(lp.sum(), [hidden, head.weight])
        for got, want in zip(grads, expected):
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
        # without entropies the linear head takes HeadLogprob: the same values and gradients
        lp = sampled_logprobs(hidden, targets, head=head, chunk_tokens=chunk)
        assert float((lp.double() - full).detach().abs().max()) <= 4e-6
        grads = torch.autograd.grad(lp.sum(), [hidden, head.weight])
        for got, want in zip(grads, expected):
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    # a head with a bias, and only the hidden states trainable (a frozen head: no weight gradient)
    biased = torch.nn.Linear(32, 3000)
    biased.weight.requires_grad_(False)
    lp = sampled_logprobs(hidden, targets, head=biased, chunk_tokens=100)
    truth = torch.log_softmax(biased(hidden).double(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert float((lp.double() - truth).detach().abs().max()) <= 4e-6
    (got,), (want,) = torch.autograd.grad(lp.sum(), [hidden]), torch.autograd.grad(truth.sum(), [hidden])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # logits given instead of hidden states
    logits = head(hidden).detach()
    assert float((sampled_logprobs(logits, targets, chunk_tokens=64).double() - full).detach().abs().max()) <= 4e-6
    # inside bf16 autocast on CPU the fp32 head reads bf16-rounded inputs but accumulates and returns
    # fp32 logits (head_matmuls): far closer to the truth than bf16 logits, and its gradient too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = sampled_logprobs(hidden, targets, head=head)
        bf16_logits = head(hidden)
    coarse = torch.log_softmax(bf16_logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    autocast_error = float((in_autocast.double() - full).detach().abs().max())
    assert 1e-6 < autocast_error < 0.02
    assert autocast_error < float((coarse.double() - full).detach().abs().max())
    grads = torch.autograd.grad(in_autocast.sum(), [hidden, head.weight])
    for got, want in zip(grads, expected):
        assert float((got.double() - want).norm() / want.norm()) < 0.02


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS needs Linux /proc")
def test_chunked_logprobs_need_less_peak_memory():
    """Forward + backward of 1,024 positions at a 16k vocabulary (64 MiB per [tokens, vocab] fp32
    copy), measured as peak resident memory in a fresh process (benchmarks/bench_logprob_memory.py)."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_logprob_memory.py"), "--tokens", "1024",
                          "--vocab", "16384", "--hidden", "32", "--chunk", "128"],
                         capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["max_abs_diff"] <= 4e-6   # log-sum-exp vs log-softmax rounding: a few ulps at |lp| ~ 10
    assert row["full_peak_mib"] >= 2 * row["one_copy_mib"]          # the full path holds several copies
    assert row["chunked_peak_mib"] < row["full_peak_mib"] / 4      # measured: 7x less at these sizes


# --- 4. tempered or truncated sampling distributions are refused --------------------------------

@pytest.mark.parametrize("setting", ["temperature=0.7", "top_p=0.9"])
def test_training_refuses_sampling_other_than_the_models_own_distribution(setting, capsys):
    with pytest.raises(ConfigError, match="temperature 1, top_p 1"):
        _cfg(setting)
    assert cli.main(["train", "--set", setting]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and setting.split("=")[0] in err[0]


# --- 5. truncated responses ---------------------------------------------------------------------

def test_length_truncation_is_recorded_summarised_and_maskable(tiny_student, forced_text, tmp_path):
    from atod_edge.envs import env_class
    from atod_edge.evaluate.evaluate import format_summary, summarize
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.rollout.runner import run_episodes

    model, tokenizer = tiny_student
    env_cls = env_class("household")
    task = env_cls().tasks("train", 1)
    action = tokenizer("<action>look</action>")["input_ids"]
    policy = TorchPolicy(model, tokenizer)
    episodes = []
    with forced_text(model, action):
        for max_new_tokens in (len(action) + 8, 3):   # ends at the stop string / cut after 3 tokens
            episodes += run_episodes(policy, env_cls, task, sampling=SamplingParams(max_new_tokens=max_new_tokens),
                                     max_turns=1)
    complete, cut = episodes[0].turns[0], episodes[1].turns[0]
    assert (complete.finish_reason, cut.finish_reason) == ("stop", "length")
    assert not complete.truncated and cut.truncated and len(cut.response_ids) == 3

    path = tmp_path / "episodes.jsonl"
    write_episodes(path, episodes)
    record = json.loads(path.read_text().splitlines()[1])
    assert record["schema_version"] == SCHEMA_VERSION == 2 and record["turns"][0]["finish_reason"] == "length"
    assert [ep.turns[0].finish_reason for ep in read_episodes(path)[0]] == ["stop", "length"]
    # a schema-1 record (no finish_reason) still reads, as not truncated
    old = Episode.from_dict({"env": "household", "task_id": "t", "seed": 0, "split": "eval", "schema_version": 1,
                             "turns": [{"observation": "o", "response": "r"}]})
    assert old.schema_version == 1 and old.turns[0].finish_reason is None and old.num_truncated == 0

    summary = summarize(episodes)
    assert summary["truncated_rate"] == 0.5 and "truncated 50.0%" in format_summary(summary)

    # truncated_turns: train keeps the cut turn's tokens in the batch, mask drops them
    trained = build_batch(episodes, _cfg("algo=grpo"), 0)
    masked = build_batch(episodes, _cfg("algo=grpo", "truncated_turns=mask"), 0)
    assert trained.stats["tokens"] == len(complete.response_ids) + 3
    assert masked.stats["tokens"] == len(complete.response_ids) and masked.responses == [complete.response_ids]

