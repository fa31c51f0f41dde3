"""Tests for train/trainer.py: advantages of a hand-built batch, the update, 3-step smoke runs of
every algorithm and ablation, and resume after a SIGKILL in the middle of a checkpoint write."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
from train_fixtures import load_weights, metric_rows, overrides, run_cli, same_weights

from atod_edge.cli import main as cli
from atod_edge.config import load_config
from atod_edge.rollout.episode import Episode, Turn, read_episodes
from atod_edge.train.config import TrainConfig
from atod_edge.train.lora import peft_available
from atod_edge.train.schedule import ScheduleConfig, coefficients
from atod_edge.train.batch import build_batch
from atod_edge.train.checkpoint import latest_checkpoint
from atod_edge.train.distributed import DistInfo
from atod_edge.train.trainer import train
from atod_edge.train.update import update

# --- build_batch on hand-built episodes ---------------------------------------------------------


def _turn(student, teacher, valid=True, prompt=(1, 2, 3)):
    return Turn(observation="obs", valid=valid, prompt_ids=list(prompt),
                response_ids=list(range(10, 10 + len(student))), student_logprobs=list(student),
                teacher_logprobs=None if teacher is None else list(teacher))


def _episode(turns, reward, group):
    return Episode(env="household", task_id="t", seed=0, split="train", turns=turns, reward=reward, group=group)


def _hand_batch():
    """Group 0: a 3-turn episode (reward 1) and a 1-turn one (reward 0). Group 1: three episodes
    with env reward 0; the last has two invalid turns, so only the penalty sets it apart."""
    a = _episode([_turn([-1.0, -3.0], [-2.0, -1.0]),      # d = 1.5, h = 2.0
                  _turn([-0.5], [-0.5]),                   # d = 0,   h = 0.5
                  _turn([-1.0, -1.5], [-0.5, -1.0])],      # d = 0.5, h = 1.25
                 reward=1.0, group=0)
    b = _episode([_turn([-1.0, -2.0], [-1.5, -1.0])], reward=0.0, group=0)
    c = _episode([_turn([-0.2], [-0.1])], reward=0.0, group=1)
    d = _episode([_turn([-0.3], [-0.6])], reward=0.0, group=1)
    e = _episode([_turn([-0.4], [-0.4], valid=False), _turn([-0.1], [-0.3], valid=False)], reward=0.0, group=1)
    return [a, b, c, d, e]


def _hand_advantages(episodes, kappa, rho, weights_per_turn, penalty):
    """A_t = kappa (lp_T - lp_S) w_k + rho A_i^GRPO, written out with the standard library."""
    rewards = [ep.reward - penalty * sum(not t.valid for t in ep.turns) for ep in episodes]
    grpo = []
    for i, ep in enumerate(episodes):
        group = [r for r, other in zip(rewards, episodes) if other.group == ep.group]
        std = statistics.stdev(group)
        grpo.append(0.0 if std == 0 else (rewards[i] - statistics.mean(group)) / (std + 1e-6))
    out = []
    for i, ep in enumerate(episodes):
        for k, turn in enumerate(ep.turns):
            w = weights_per_turn[i][k]
            out += [kappa * (t - s) * w + rho * grpo[i] for s, t in zip(turn.student_logprobs, turn.teacher_logprobs)]
    return out


def _cfg(*extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, list(extra))


def test_build_batch_matches_the_hand_computed_atod_advantages():
    episodes = _hand_batch()
    step = 40  # T = 80: p = 0.5, kappa = 0.55, rho = 1.5
    batch = build_batch(episodes, _cfg(), step)
    kappa, rho = 0.55, 1.5
    # episode a: d = [1.5, 0, 0.5] -> [1, 0, 1/3]; h = [2, 0.5, 1.25] -> [1, 0, 0.5]
    w_a = [1.0, 0.0, 1 - (1 - 1 / 3) * (1 - 0.5)]
    # one-turn trajectories: 0.75; e: d = [0, 0.2] -> [0, 1], h = [0.4, 0.1] -> [1, 0] -> [1, 1]
    weights = [w_a, [0.75], [0.75], [0.75], [1.0, 1.0]]
    expected = _hand_advantages(episodes, kappa, rho, weights, penalty=0.1)
    assert batch.stats["kappa"] == pytest.approx(kappa) and batch.stats["rho"] == pytest.approx(rho)
    torch.testing.assert_close(batch.advantages, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    # the T-DUR values are written back onto the turns for the records and the TUI
    assert [t.weight for t in episodes[0].turns] == pytest.approx(w_a)
    assert episodes[1].turns[0].weight == pytest.approx(0.75)
    assert [t.disagreement for t in episodes[0].turns] == pytest.approx([1.5, 0.0, 0.5])
    assert [t.uncertainty for t in episodes[0].turns] == pytest.approx([2.0, 0.5, 1.25])
    assert batch.stats["mean_turn_weight"] == pytest.approx(sum(map(sum, weights)) / 8)
    assert batch.stats["tokens"] == 11
    assert batch.token_offsets == [0, 2, 3, 5, 7, 8, 9, 10]


def test_invalid_action_penalty_enters_the_grpo_reward():
    # group 1 has rewards 0, 0, 0: only the penalty of e's two invalid turns separates them
    episodes = _hand_batch()
    grpo_only = build_batch(episodes, _cfg("algo=grpo"), 0).advantages
    group1 = grpo_only[-4:]          # c, d (one token each), e (two tokens)
    r = [0.0, 0.0, -0.2]
    mean, std = statistics.mean(r), statistics.stdev(r) + 1e-6
    expected = [(r[0] - mean) / std, (r[1] - mean) / std, (r[2] - mean) / std, (r[2] - mean) / std]
    torch.testing.assert_close(group1, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    no_penalty = build_batch(_hand_batch(), _cfg("algo=grpo", "invalid_penalty=0"), 0).advantages
    assert torch.equal(no_penalty[-4:], torch.zeros(4))
    # a penalty of 0.5: the same ranking, a larger gap before normalisation, equal after it
    heavier = build_batch(_hand_batch(), _cfg("algo=grpo", "invalid_penalty=0.5"), 0).advantages
    torch.testing.assert_close(heavier[-4:], group1, atol=1e-4, rtol=1e-4)


def test_grpo_signal_stats_count_all_fail_groups_and_the_penalty_share():
    # group 0: a wins (reward 1), b fails; group 1 fails everywhere and only the penalty of e's
    # two invalid turns gives it a signal (ATOD.md section 6)
    episodes = _hand_batch()
    episodes[0].success = True
    stats = build_batch(episodes, _cfg("algo=grpo"), 0).stats
    assert (stats["grpo_groups"], stats["grpo_all_fail_groups"]) == (2, 1)
    assert stats["grpo_penalty_only_groups"] == stats["grpo_all_fail_penalty_only_groups"] == 1
    r = [0.0, 0.0, -0.2]
    mean, std = statistics.mean(r), statistics.stdev(r) + 1e-6
    group1 = abs(r[0] - mean) / std * 2 + abs(r[2] - mean) / std * 2   # c, d one token each; e two
    group0 = 0.5 / (statistics.stdev([1.0, 0.0]) + 1e-6) * 7            # a: 5 tokens, b: 2
    assert stats["grpo_abs_adv_all_fail"] == stats["grpo_abs_adv_all_fail_penalty_only"] == pytest.approx(group1)
    assert stats["grpo_abs_adv"] == pytest.approx(group0 + group1)
    # no penalty: the all-fail group carries nothing; OPD (no GRPO term) logs none of it
    episodes = _hand_batch()
    episodes[0].success = True
    flat = build_batch(episodes, _cfg("algo=grpo", "invalid_penalty=0"), 0).stats
    assert flat["grpo_abs_adv_all_fail"] == 0.0 and flat["grpo_penalty_only_groups"] == 0
    assert "grpo_groups" not in build_batch(_hand_batch(), _cfg("algo=opd"), 0).stats


def test_opd_uses_uniform_weights_and_grpo_needs_no_teacher():
    episodes = _hand_batch()
    batch = build_batch(episodes, _cfg("algo=opd"), 7)
    expected = [t - s for ep in episodes for turn in ep.turns
                for s, t in zip(turn.student_logprobs, turn.teacher_logprobs)]
    torch.testing.assert_close(batch.advantages, torch.tensor(expected))
    assert {turn.weight for ep in episodes for turn in ep.turns} == {1.0}
    no_teacher = _hand_batch()
    for ep in no_teacher:
        for turn in ep.turns:
            turn.teacher_logprobs = None
    assert build_batch(no_teacher, _cfg("algo=grpo"), 0).stats["kappa"] == 0.0
    with pytest.raises(ValueError, match="teacher log-probs"):
        build_batch(no_teacher, _cfg("algo=atod"), 0)


def test_weight_ablations_change_only_the_opd_weights():
    no_grpo = ["schedule.rho_init=0", "schedule.rho_max=0"]   # isolate kappa * (lp_T - lp_S) * w
    gaps = [t - s for ep in _hand_batch() for turn in ep.turns
            for s, t in zip(turn.student_logprobs, turn.teacher_logprobs)]

    def weights(*extra):
        adv = build_batch(_hand_batch(), _cfg(*no_grpo, *extra), 0).advantages.tolist()
        return [a / g if g else None for a, g in zip(adv, gaps)]

    assert all(w == pytest.approx(1.0) for w in weights("weights=uniform") if w is not None)
    # disagreement only: a's turns [1, 0, 1/3] (turn 2 has gap 0), one-turn episodes 0.5
    assert weights("weights=disagreement")[:5] == pytest.approx([1.0, 1.0, None, 1 / 3, 1 / 3], rel=1e-5)
    assert weights("weights=uncertainty")[5:7] == pytest.approx([0.5, 0.5], rel=1e-5)
    # without annealing kappa stays 1 at every step
    late = build_batch(_hand_batch(), _cfg(*no_grpo, "schedule.anneal=false"), 500)
    assert late.stats["kappa"] == 1.0


def test_token_level_weights_leave_turn_weights_unset():
    episodes = _hand_batch()
    batch = build_batch(episodes, _cfg("weights=token"), 0)
    assert all(turn.weight is None for ep in episodes for turn in ep.turns)
    assert 0.0 <= batch.stats["mean_turn_weight"] <= 1.0


# --- the update with a real model ---------------------------------------------------------------


def test_update_raises_the_logprob_of_a_positive_advantage_response(tiny_student, one_thread):
    from copy import deepcopy

    from atod_edge.scoring.logprobs import response_logprobs

    model, tokenizer = tiny_student
    student = deepcopy(model)
    prompt = tokenizer("Goal: put the apple in the fridge.")["input_ids"]
    good = tokenizer("<action>open fridge 1</action>")["input_ids"]
    bad = tokenizer("<action>look</action>")["input_ids"]
    with torch.no_grad():
        old = response_logprobs(student, [prompt, prompt], [good, bad])
    # a GRPO group of two: the good response won
    episodes = [_episode([Turn("o", prompt_ids=prompt, response_ids=good, student_logprobs=old[0].tolist())], 1.0, 0),
                _episode([Turn("o", prompt_ids=prompt, response_ids=bad, student_logprobs=old[1].tolist())], 0.0, 0)]
    cfg = _cfg("algo=grpo", "lr=1e-4", "micro_batch=1")   # micro_batch 1: gradient accumulation
    batch = build_batch(episodes, cfg, 0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    stats = update(student, optimizer, batch, cfg, DistInfo(), pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        new = response_logprobs(student, [prompt, prompt], [good, bad])
    # the surrogate pushes the winner's log-prob up relative to the loser's
    assert new[0].sum() - new[1].sum() > old[0].sum() - old[1].sum()
    assert new[0].sum() > old[0].sum()
    assert stats["tokens"] == len(good) + len(bad)
    assert stats["mean_ratio"] == pytest.approx(1.0) and stats["clip_fraction"] == 0.0
    assert stats["grad_norm"] > 0 and math.isfinite(stats["loss"])


def _household_batch(tokenizer, model) -> "TokenBatch":
    """Real household turns (two tasks, two noisy-expert episodes each: the turns share prompt
    prefixes), the model's own log-probs as lp_S and random advantages."""
    from atod_edge.envs import env_class
    from atod_edge.prompts import encode_prompt
    from atod_edge.rollout.runner import episode_messages, run_scripted
    from atod_edge.scoring.logprobs import response_logprobs
    from atod_edge.train.batch import TokenBatch

    env = env_class("household")
    prompts, responses = [], []
    for seed in (0, 1):
        for ep in run_scripted("noisy", env, env().tasks("train", 2), seed=seed, noise=0.5):
            for k, turn in enumerate(ep.turns[:4]):
                prompts.append(encode_prompt(tokenizer, episode_messages(ep, k, env.instructions)))
                responses.append(tokenizer(turn.response, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        old = torch.cat(response_logprobs(model, prompts, responses, pad_id=tokenizer.pad_token_id))
    offsets = [sum(map(len, responses[:k])) for k in range(len(responses))]
    advantages = torch.randn(len(old), generator=torch.Generator().manual_seed(0))
    return TokenBatch(prompts, responses, offsets, old, advantages, {})


@pytest.mark.parametrize("lora", [False, pytest.param(True, marks=pytest.mark.skipif(
    not peft_available(), reason="peft is not installed (extra: lora)"))])
def test_update_with_prefix_reuse_has_the_per_turn_gradients(tiny_student, one_thread, lora):
    """The same batch through update() with and without prefix reuse: the same gradients (to 1e-5
    relative per parameter), loss and stats. lr 0 and no clipping: the gradients stay in .grad."""
    from copy import deepcopy

    model, tokenizer = tiny_student
    batch = _household_batch(tokenizer, model)
    results = []
    for reuse in (False, True):
        student = deepcopy(model)
        if lora:
            from atod_edge.train.lora import add_adapters

            torch.manual_seed(0)   # the same adapter initialisation for both paths
            student = add_adapters(student, 4, 8.0, 0.0, ["q_proj", "v_proj", "down_proj"]).get_base_model()
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():   # B starts at zero, which would leave A without gradient
                for name, param in student.named_parameters():
                    if "lora_B" in name:
                        param.copy_(0.05 * torch.randn(param.shape, generator=gen))
        cfg = _cfg("algo=grpo", "lr=0", "max_grad_norm=0", "micro_batch=6", f"prefix_reuse={str(reuse).lower()}")
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=0.0)
        stats = update(student, optimizer, batch, cfg, DistInfo(), pad_id=tokenizer.pad_token_id)
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        results.append((stats, grads))
    (per_turn, expected), (shared, got) = results
    assert set(got) == set(expected) and (not lora or all("lora" in n for n in got))
    for name, grad in expected.items():
        assert float(grad.norm()) > 0, name
        assert float((got[name] - grad).norm() / grad.norm()) < 1e-5, name
    for key in ("loss", "grad_norm", "mean_ratio"):
        assert shared[key] == pytest.approx(per_turn[key], rel=1e-5), key
    assert shared["tokens"] == per_turn["tokens"] == sum(map(len, batch.responses))


# --- 3-step smoke runs of every algorithm and ablation ----------------------------------------

SMOKE_RUNS = {
    "atod": [],
    "opd": ["algo=opd"],
    "grpo": ["algo=grpo"],
    "no-anneal": ["schedule.anneal=false"],
    "uniform": ["weights=uniform"],
    "token": ["weights=token"],
    "disagreement": ["weights=disagreement"],
    "uncertainty": ["weights=uncertainty"],
}


def _smoke(name: str, root: Path, teacher: Path) -> tuple[TrainConfig, Path, Path]:
    cfg = load_config(TrainConfig, None, overrides() + SMOKE_RUNS[name])
    run_dir = root / name
    final = train(cfg, run_dir, "tiny-student", str(teacher), log=lambda *a: None)
    return cfg, run_dir, final


@pytest.fixture(scope="module")
def atod_run(small_teacher, one_thread, tmp_path_factory):
    """The 3-step ATOD run, shared by the smoke test and the resume test (its reference)."""
    return _smoke("atod", tmp_path_factory.mktemp("smoke"), small_teacher)


@pytest.mark.parametrize("name", list(SMOKE_RUNS))
def test_three_step_smoke_run(name, atod_run, small_teacher, atod_cache, tmp_path):
    from atod_edge.models.presets import resolve_model

    cfg, run_dir, final = atod_run if name == "atod" else _smoke(name, tmp_path, small_teacher)
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    schedule = ScheduleConfig(anneal_steps=2, anneal=cfg.schedule.anneal)
    for row in rows:
        kappa, rho = coefficients(row["step"], cfg.algo, schedule)
        assert (row["kappa"], row["rho"]) == (pytest.approx(kappa), pytest.approx(rho))
        for key in ("success", "reward", "episode_len", "mean_turn_weight", "mean_abs_log_ratio", "loss",
                    "grad_norm", "tokens", "lr"):
            assert math.isfinite(row[key]), key
        assert row["tokens"] > 0 and row["episode_len"] == 2.0 and row["episodes"] == 2
        # the GRPO term's signal stats: logged wherever that term is on (rho != 0)
        assert ("grpo_groups" in row) == (cfg.algo != "opd")
        if cfg.algo != "opd":
            assert 0 <= row["grpo_all_fail_penalty_only_groups"] <= row["grpo_all_fail_groups"] <= row["grpo_groups"]
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3])   # the rate each step used (warmup 2)
    if cfg.algo == "opd":
        assert [(r["kappa"], r["rho"]) for r in rows] == [(1.0, 0.0)] * 3
    elif cfg.algo == "grpo":
        assert [(r["kappa"], r["rho"]) for r in rows] == [(0.0, 1.0)] * 3
    elif cfg.schedule.anneal:
        assert [(r["kappa"], r["rho"]) for r in rows] == [(1.0, 1.0), (0.55, 1.5), (pytest.approx(0.1), 2.0)]
    else:
        assert [(r["kappa"], r["rho"]) for r in rows] == [(1.0, 1.0)] * 3

    # samples with token-level fields, T-DUR weights in [0, 1] on the turns
    for step in range(3):
        episodes, skipped = read_episodes(run_dir / "samples" / f"step_{step:06d}.jsonl")
        assert len(episodes) == 2 and skipped == 0
        for turn in (t for ep in episodes for t in ep.turns):
            assert len(turn.response_ids) == len(turn.student_logprobs) > 0
            assert (turn.teacher_logprobs is None) == (cfg.algo == "grpo")
            if cfg.weights == "token" and cfg.algo != "opd":
                assert turn.weight is None
            else:
                assert 0.0 <= turn.weight <= 1.0
                if cfg.algo == "opd" or cfg.weights == "uniform":
                    assert turn.weight == 1.0

    # the two newest checkpoints, complete, and nothing half-written
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_000002", "step_000003"]
    assert final == run_dir / "checkpoints" / "step_000003"
    for name_ in ("model.safetensors", "tokenizer.json", "config.json", "trainer_state.pt"):
        assert (final / name_).is_file()
    assert (run_dir / "config.yaml").is_file()

    before = load_weights(resolve_model("tiny-student"))
    after = load_weights(final)
    if cfg.algo != "grpo":
        assert not same_weights(before, after)
        assert all(r["grad_norm"] > 0 for r in rows)
    else:
        # A random student never emits a parseable action: every episode is all-invalid, every
        # group flat, so GRPO has no signal and must not move the weights (see the update test
        # for GRPO with signal).
        episodes = [ep for s in range(3) for ep in read_episodes(run_dir / "samples" / f"step_{s:06d}.jsonl")[0]]
        flat = len({ep.reward - 0.1 * ep.num_invalid for ep in episodes}) == 1
        assert same_weights(before, after) == flat
        if flat:
            assert all(r["grad_norm"] == 0 for r in rows)


# --- resume ----------------------------------------------------------------------------------


def test_resume_after_sigkill_mid_checkpoint_matches_the_uninterrupted_run(atod_run, small_teacher, tmp_path,
                                                                            capsys):
    _, reference_dir, reference_final = atod_run
    run_dir = tmp_path / "killed"
    args = ["train", "--out", str(run_dir), "--set", "student=tiny-student", "--set", f"teacher={small_teacher}",
            *[a for o in overrides() for a in ("--set", o)]]
    # killed after writing the weights of checkpoint 2, before its rename
    killed = run_cli(args, cwd=tmp_path, ATOD_EDGE_TEST_KILL_IN_CHECKPOINT="2")
    assert killed.returncode == -9, killed.stderr
    partial = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".step_000002")]
    assert partial and any(partial[0].rglob("model.safetensors"))
    assert latest_checkpoint(run_dir) == (1, run_dir / "checkpoints" / "step_000001")
    assert [r["step"] for r in metric_rows(run_dir)] == [0, 1]   # step 1's row, but no checkpoint 2

    # resumed in this process (same thread count as the reference): saves a second start-up
    assert cli.main(["train", "--resume", str(run_dir)]) == 0
    assert f"resuming {run_dir} after step 1" in capsys.readouterr().out
    assert metric_rows(run_dir) == metric_rows(reference_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    assert same_weights(load_weights(run_dir / "checkpoints" / "step_000003"), load_weights(reference_final))
    # and the trainer state (optimizer moments, step) equals the uninterrupted run's
    state = torch.load(run_dir / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=True)
    reference = torch.load(reference_final / "trainer_state.pt", weights_only=True)
    assert state["step"] == reference["step"] == 3
    for key, moments in reference["optimizer"]["state"].items():
        assert torch.equal(state["optimizer"]["state"][key]["exp_avg"], moments["exp_avg"])


def test_stop_after_one_step_then_resume_to_three_matches_the_uninterrupted_run(atod_run, small_teacher,
                                                                               tmp_path):
    """steps=1, then resume with steps=3 (in-process): the same metrics and weights as the 3-step
    run (the tasks of a step and the learning rate do not depend on the total step count)."""
    _, reference_dir, reference_final = atod_run
    run_dir = tmp_path / "short"
    train(load_config(TrainConfig, None, overrides(steps=1)), run_dir, "tiny-student", str(small_teacher),
          log=lambda *a: None)
    assert [r["step"] for r in metric_rows(run_dir)] == [0]
    messages = []
    final = train(load_config(TrainConfig, None, overrides(steps=3)), run_dir, "tiny-student",
                  str(small_teacher), resume=True, log=messages.append)
    assert messages == [f"resuming {run_dir} after step 1"]
    assert metric_rows(run_dir) == metric_rows(reference_dir)
    assert same_weights(load_weights(final), load_weights(reference_final))
