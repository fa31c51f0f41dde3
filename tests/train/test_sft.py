"""Tests for train/sft.py: the `atod-edge sft` command, that SFT lowers the demonstrations'
loss, the learning-rate shapes, the run records (loss and eval rows, curves), resume after an
interruption, and clean errors for bad demonstration files and options."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_fixtures import interrupt_sft_at_step, load_weights, same_weights

from atod_edge.cli import main as cli
from atod_edge.config import load_config
from atod_edge.envs import env_class
from atod_edge.rollout.episode import read_episodes
from atod_edge.errors import UserError
from atod_edge.io import read_jsonl
from atod_edge.models.loading import check_same_tokenizer, load_model
from atod_edge.models.presets import resolve_model
from atod_edge.scoring.logprobs import response_logprobs
from atod_edge.train.config import SFTConfig
from atod_edge.train.demos import build_examples, demo_episodes
from atod_edge.train.sft import lr_factor, train_sft, work_dir


def test_sft_command_writes_a_loadable_checkpoint(atod_cache, one_thread, tmp_path, capsys):
    out = tmp_path / "sft"
    code = cli.main(["sft", "--env", "household", "--model", "tiny-student", "--demos", "expert", "--episodes", "3",
                     "--set", "epochs=1", "--set", "eval_episodes=0", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "sft: 3 demos (3 successful)" in capsys.readouterr().out
    model, tokenizer = load_model(out)
    _, student_tokenizer = load_model("tiny-student")
    check_same_tokenizer(tokenizer, student_tokenizer)   # raises if the saved tokenizer differs
    assert not same_weights(load_weights(out), load_weights(resolve_model("tiny-student")))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())   # no temporary dir left


def _mean_nll(model, examples, pad_id) -> float:
    with torch.no_grad():
        lps = response_logprobs(model, [p for p, _ in examples], [r for _, r in examples], pad_id=pad_id)
    return float(-torch.cat(lps).mean())


def test_sft_lowers_the_loss_of_its_demonstrations(atod_cache, one_thread, tmp_path):
    cfg = SFTConfig(env="household", model="tiny-student", demos="expert", episodes=1, epochs=4, batch_size=32,
                    lr=3e-3, warmup_steps=0, eval_episodes=0, out=str(tmp_path / "sft"))
    before, tokenizer = load_model("tiny-student")
    # one episode's turns fit one batch: four optimizer steps on the same fixed batch
    examples = build_examples(demo_episodes(cfg), tokenizer, env_class("household").instructions, cfg.history_turns)
    assert 0 < len(examples) <= cfg.batch_size
    assert all(response[-1] == tokenizer.eos_token_id for _, response in examples)  # learns to stop
    after, _ = load_model(train_sft(cfg, log=lambda *a: None))
    nll_before = _mean_nll(before, examples, tokenizer.pad_token_id)
    nll_after = _mean_nll(after, examples, tokenizer.pad_token_id)
    assert nll_after < nll_before - 0.5, (nll_before, nll_after)


@pytest.mark.parametrize("content", [
    None,                                                                 # no such file
    b"not json\n\x00\xff\n",                                              # garbage
    b'{"env": "household", "turns": [{"observation": 5, "response": 7, "action": "go"}]}\n',  # wrong types
    b'{"turns": "x"}\n[1, 2]\n',                                          # wrong shapes
])
def test_bad_demos_file_gives_a_one_line_error(content, atod_cache, tmp_path, capsys):
    demos = tmp_path / "demos.jsonl"
    if content is not None:
        demos.write_bytes(content)
    code = cli.main(["sft", "--model", "tiny-student", "--demos", str(demos), "--set", "eval_episodes=0",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("atod-edge sft: error: ")
    assert not (tmp_path / "out").exists()


# --- learning-rate shapes --------------------------------------------------------------------

def test_linear_lr_is_the_original_schedule_and_the_others_follow_their_shapes():
    total, warmup = 10, 4
    for s in range(total):
        original = min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / total)
        assert lr_factor(s, total, warmup, "linear") == original   # bit for bit: bootstraps are unchanged
    assert [lr_factor(s, total, warmup, "constant") for s in (0, 3, 9)] == [0.25, 1.0, 1.0]
    # cosine: the peak at the end of warmup, half way down in the middle of the rest, to 0 at `total`
    assert lr_factor(3, total, warmup, "cosine") == 1.0
    assert lr_factor(7, total, warmup, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, total, warmup, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))
    # the floor: min_ratio + (1 - min_ratio) * decay
    assert lr_factor(7, total, warmup, "cosine", min_ratio=0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_factor(5, total, 0, "linear", min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)


# --- run records and resume ------------------------------------------------------------------

# 2 expert household episodes: 17 turns, 5 steps of 4 turns per epoch, 10 steps in all
RUN = {"env": "household", "model": "tiny-student", "demos": "expert", "episodes": 2, "epochs": 2, "batch_size": 4,
       "micro_batch": 4, "lr": 3e-3, "warmup_steps": 2, "lr_schedule": "cosine", "min_lr_ratio": 0.1,
       "eval_episodes": 0, "eval_every": 4, "eval_every_episodes": 1, "checkpoint_every": 2}


def _run_args(out) -> list[str]:
    return ["sft", "--out", str(out), *[a for k, v in RUN.items() for a in ("--set", f"{k}={v}")]]


def _rows(out) -> list[dict]:
    rows, skipped = read_jsonl(work_dir(out) / "metrics.jsonl")
    assert skipped == 0
    return rows


def _comparable(rows: list[dict]) -> list[dict]:
    """Rows without wall-clock times and the output path."""
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "saved"} for r in rows]


@pytest.fixture(scope="module")
def sft_reference(atod_cache, one_thread, tmp_path_factory):
    """The uninterrupted 10-step run: the reference of the resume test."""
    out = tmp_path_factory.mktemp("sft-reference") / "model"
    train_sft(SFTConfig(**RUN, out=str(out)), log=lambda *a: None)
    return out


def test_sft_writes_loss_rows_periodic_eval_rows_and_a_curve(sft_reference):
    work = work_dir(sft_reference)
    rows = _rows(sft_reference)
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == list(range(10))
    assert [r["epoch"] for r in losses] == [0] * 5 + [1] * 5
    assert [r["examples"] for r in losses] == [4, 4, 4, 4, 1] * 2
    assert [r["lr"] for r in losses] == pytest.approx([3e-3 * lr_factor(s, 10, 2, "cosine", 0.1) for s in range(10)])
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens"] > 0 for r in losses)
    assert losses[-1]["loss"] < losses[0]["loss"]
    evals = [r for r in rows if "eval_success" in r]
    assert [r["step"] for r in evals] == [3, 7]   # after steps 4 and 8
    assert all(0.0 <= r["eval_success"] <= 1.0 and r["eval_episodes"] == 1 and r["eval_turns"] > 0 for r in evals)
    assert rows[-1]["saved"] == str(sft_reference) and rows[-1]["step"] == 9
    assert (work / "curves.png").stat().st_size > 0
    assert not (work / "checkpoints").exists()   # the final model replaced them
    assert load_config(SFTConfig, str(work / "config.yaml")) == SFTConfig(**RUN, out=str(sft_reference))
    assert not any(p.name.startswith(".") for p in sft_reference.parent.iterdir())   # nothing half-written


def test_interrupted_then_resumed_sft_matches_the_uninterrupted_run(sft_reference, one_thread, tmp_path,
                                                                   monkeypatch, capsys):
    out = tmp_path / "model"
    interrupt_sft_at_step(monkeypatch, 8)
    assert cli.main(_run_args(out)) == 130
    assert f"last checkpoint is step 6: continue with `atod-edge sft --resume {out}`" in capsys.readouterr().err
    monkeypatch.undo()
    checkpoints = work_dir(out) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000006"]   # the newest only
    assert [r["step"] for r in _rows(out) if "loss" in r] == list(range(7))   # step 7's row is after it
    assert not out.exists()

    # a fresh run over it refuses; --resume continues mid-epoch 2 and drops the rows after step 6
    assert cli.main(_run_args(out)) == 1
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["sft", "--resume", str(out)]) == 0
    assert f"resuming {work_dir(out)} after step 6" in capsys.readouterr().out
    assert same_weights(load_weights(out), load_weights(sft_reference))
    assert _comparable(_rows(out)) == _comparable(_rows(sft_reference))
    assert not checkpoints.exists()

    assert cli.main(["sft", "--resume", str(work_dir(out))]) == 1   # the work dir names the run too
    assert "is complete" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["--set", "lr_schedule=step"],
    ["--set", "min_lr_ratio=2"],
    ["--set", "checkpoint_every=-1"],
    ["--resume", "no-such-run"],
    ["--resume", "x", "--out", "y"],
])
def test_bad_sft_option_gives_a_one_line_error(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["sft", "--model", "tiny-student", *args])
    err = capsys.readouterr().err
    assert code in (1, 2)
    assert len(err.strip().splitlines()) == 1 and err.startswith("atod-edge sft: error: "), err
    assert list(tmp_path.iterdir()) == []


def test_prompt_loss_weight_adds_the_prompt_tokens_mean_nll(atod_cache, one_thread):
    """The loss with prompt_loss_weight=w equals response mean NLL + w * prompt mean NLL, both
    computed here from one plain full-sequence forward per example."""
    from atod_edge.train.sft import chunk_loss

    model, tokenizer = load_model("tiny-student")
    cfg = SFTConfig(env="household", demos="expert", episodes=1, prompt_loss_weight=0.3)
    examples = build_examples(demo_episodes(cfg), tokenizer, env_class("household").instructions, 2)[:3]
    n_resp = sum(len(r) for _, r in examples)
    n_prompt = sum(len(p) - 1 for p, _ in examples)
    resp_nll = prompt_nll = 0.0
    with torch.no_grad():
        for p, r in examples:
            ids = torch.tensor([list(p) + list(r)])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            token_nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
            prompt_nll += float(token_nll[:len(p) - 1].sum())
            resp_nll += float(token_nll[len(p) - 1:].sum())
        pad = tokenizer.pad_token_id
        with_prompt = float(chunk_loss(model, examples, pad, cfg, n_resp, n_prompt))
        cfg.prompt_loss_weight = 0.0
        response_only = float(chunk_loss(model, examples, pad, cfg, n_resp, n_prompt))
    assert response_only == pytest.approx(resp_nll / n_resp, rel=1e-4)
    assert with_prompt == pytest.approx(resp_nll / n_resp + 0.3 * prompt_nll / n_prompt, rel=1e-4)
    assert with_prompt > response_only + 0.1   # the prompt term is really there


@pytest.mark.parametrize("prompt_loss_weight", [0.0, 0.5])
def test_sft_loss_with_prefix_reuse_has_the_per_turn_value_and_gradients(atod_cache, one_thread, prompt_loss_weight):
    """chunk_loss over turns of two demo episodes (they share the system text and, within an
    episode, the task) with prefix_reuse on and off: the same loss and gradients (1e-5 relative)."""
    from atod_edge.train.sft import chunk_loss

    model, tokenizer = load_model("tiny-student")
    cfg = SFTConfig(env="household", demos="noisy", episodes=2, prompt_loss_weight=prompt_loss_weight)
    examples = build_examples(demo_episodes(cfg), tokenizer, env_class("household").instructions, 2)[:10]
    n_resp, n_prompt = sum(len(r) for _, r in examples), sum(len(p) - 1 for p, _ in examples)
    results = []
    for reuse in (False, True):
        cfg.prefix_reuse = reuse
        model.zero_grad(set_to_none=True)
        loss = chunk_loss(model, examples, tokenizer.pad_token_id, cfg, n_resp, n_prompt)
        loss.backward()
        results.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_turns, expected), (loss_shared, got) = results
    assert loss_shared == pytest.approx(loss_turns, rel=1e-5)
    for name, grad in expected.items():
        assert float(grad.norm()) > 0, name
        assert float((got[name] - grad).norm() / grad.norm()) < 1e-5, name


@pytest.mark.parametrize("reuse", [False, True])
def test_sft_loss_in_bf16_autocast_is_near_fp32_and_keeps_fp32_master_gradients(atod_cache, one_thread, reuse):
    """precision=bf16: the forward computes in bf16 autocast (CPU too), so the loss moves by bf16
    rounding but not more; weights and their gradients stay fp32."""
    import torch

    from atod_edge.train.sft import chunk_loss

    model, tokenizer = load_model("tiny-student")
    examples = build_examples(demo_episodes(SFTConfig(env="household", demos="noisy", episodes=2)), tokenizer,
                              env_class("household").instructions, 2)[:6]
    n_resp, n_prompt = sum(len(r) for _, r in examples), sum(len(p) - 1 for p, _ in examples)
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = SFTConfig(env="household", prefix_reuse=reuse, precision=precision)
        model.zero_grad(set_to_none=True)
        loss = chunk_loss(model, examples, tokenizer.pad_token_id, cfg, n_resp, n_prompt)
        loss.backward()
        losses[precision] = float(loss)
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert losses["bf16"] != losses["fp32"]   # bf16 really ran
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_dart_demos_train_on_the_expert_label_of_every_turn(atod_cache):
    """Every dart turn is an example (invalid executed actions included), and its target is the
    expert's action in that state, not the executed one."""
    _, tokenizer = load_model("tiny-student")
    cfg = SFTConfig(env="household", demos="dart", noise=0.4, episodes=4, seed=2)
    episodes = demo_episodes(cfg)
    turns = [t for ep in episodes for t in ep.turns]
    assert any(not t.valid for t in turns)
    examples = build_examples(episodes, tokenizer, env_class("household").instructions, 2)
    assert len(examples) == len(turns)
    targets = [tokenizer.decode(r[:-1]) for _, r in examples]
    assert targets == [f"<action>{t.expert_action}</action>" for t in turns]


def test_dagger_demos_label_the_models_own_states_with_the_expert_and_are_read_back(
        atod_cache, one_thread, tmp_path, capsys):
    """dagger demos: the start model's own episodes, every turn labelled with the expert's action
    in that state (checked by replaying the episode in a fresh env); a fresh run trains on all of
    them; a resumed run (no model given) reads the saved demos back instead of rolling out again."""
    from atod_edge.train.demos import dagger_episodes

    out = tmp_path / "sft"
    cfg = SFTConfig(env="household", model="tiny-student", demos="dagger", episodes=1, demo_start=5, epochs=1,
                    eval_episodes=0, out=str(out))
    train_sft(cfg, log=print)
    saved = work_dir(out) / "dagger_demos.jsonl"
    episodes, skipped = read_episodes(saved)
    tasks = env_class("household")().tasks("train", 1, start=5)
    assert skipped == 0 and [ep.task_id for ep in episodes] == [t.task_id for t in tasks]
    turns = [t for ep in episodes for t in ep.turns]
    assert any(not t.valid for t in turns)          # an untrained model's own mistakes are in the demos
    for ep, task in zip(episodes, tasks):
        env = env_class("household")()
        env.reset(task)
        for turn in ep.turns:
            assert turn.expert_action == env.expert_action()
            env.step(turn.action or "")
    data = json.loads((work_dir(out) / "data.json").read_text())
    assert data["examples"] == len(turns)
    assert f"dagger demos from tiny-student: success {float(episodes[0].success):.1%}" in capsys.readouterr().out

    cfg.model = "no-such-model"   # a resumed run must not load (or roll out) the start model again
    again = dagger_episodes(cfg, tasks, work_dir(out), log=lambda *a: None)
    assert [ep.to_dict() for ep in again] == [ep.to_dict() for ep in episodes]


def test_mixed_demos_take_consecutive_shares_of_the_tasks_one_kind_each():
    cfg = SFTConfig(env="household", demos="dart+expert", episodes=5, demo_start=7, noise=0.4, seed=1)
    episodes = demo_episodes(cfg)
    assert [ep.task_id for ep in episodes] == [f"household/train/{i}" for i in range(7, 12)]
    dart, expert = episodes[:2], episodes[2:]
    assert all(t.expert_action for ep in dart for t in ep.turns)          # dart labels every state
    assert all(t.expert_action is None and t.valid for ep in expert for t in ep.turns)
    alone = demo_episodes(SFTConfig(env="household", demos="expert", episodes=3, demo_start=9, seed=1))
    assert [ep.to_dict() for ep in alone] == [ep.to_dict() for ep in expert]   # each share is that kind's demos
    with pytest.raises(UserError, match="dart\\+dagger"):
        demo_episodes(SFTConfig(env="household", demos="dart+nonsense", episodes=2))
