"""Tests for train/sft.py: the `atod-edge sft` command, that SFT lowers the demonstrations'
loss, and clean errors for bad demonstration files."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import load_weights, same_weights

from atod_edge import cli
from atod_edge.envs import env_class
from atod_edge.models import check_same_tokenizer, load_model, resolve_model
from atod_edge.scoring import response_logprobs
from atod_edge.train.sft import SFTConfig, build_examples, demo_episodes, train_sft


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
