"""End-to-end tests of the `atod-edge` command line (atod_edge/cli/) on the tiny presets.
train, sft, export and tui have their own tests beside their stages."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

from atod_edge.cli.main import main
from atod_edge.rollout.episode import read_episodes

SUBCOMMANDS = ("train", "sft", "eval", "export", "tui", "env", "models", "config")


def cli_command() -> list[str]:
    script = shutil.which("atod-edge")
    return [script] if script else [sys.executable, "-m", "atod_edge.cli"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_help_lists_every_stage():
    proc = subprocess.run(cli_command() + ["--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for name in SUBCOMMANDS:
        assert f"    {name}" in proc.stdout, name


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_env_list(capsys):
    assert main(["env", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("household", "shop", "searchqa"):
        assert name in out


def test_env_play_driven_by_expert_lines(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("expert\n" * 40))
    assert main(["env", "play", "household", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "(expert)" in out and "won after" in out
    assert "admissible:" in out


def test_env_play_quits_and_survives_nonsense(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("fly to the moon\nquit\n"))
    assert main(["env", "play", "shop"]) == 0
    assert capsys.readouterr().out.count("admissible:") == 2


def test_env_play_unknown_env_is_one_clean_line(capsys):
    assert main(["env", "play", "nosuchenv"]) == 1
    assert "unknown env 'nosuchenv'" in one_error_line(capsys)


def test_eval_expert_writes_report_and_episodes(tmp_path, capsys):
    out = tmp_path / "expert"
    assert main(["eval", "--policy", "expert", "--env", "household", "--episodes", "20", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "success 100.0%" in stdout and str(out) in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["success"] == 1.0 and report["episodes"] == 20 and report["policy"] == "expert"
    episodes, skipped = read_episodes(out / "episodes.jsonl")
    assert len(episodes) == 20 and skipped == 0 and all(ep.success for ep in episodes)


def test_eval_random_is_low(tmp_path, capsys):
    out = tmp_path / "random"
    assert main(["eval", "--policy", "random", "--env", "household", "--episodes", "20", "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["success"] <= 0.2


def test_eval_a_model_reports_tokens_per_second(atod_cache, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["eval", "--model", "tiny-student", "--env", "searchqa", "--episodes", "2",
                 "--set", "max_new_tokens=4", "--out", str(out)]) == 0
    assert "tok/s" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["tokens_per_s"] > 0 and report["generated_tokens"] > 0 and report["episodes"] == 2
    episodes, _ = read_episodes(out / "episodes.jsonl")
    assert all(turn.prompt_ids and turn.student_logprobs for ep in episodes for turn in ep.turns)


def test_eval_precision_bf16_decodes_bf16_weights(atod_cache, tmp_path, capsys):
    import torch

    from atod_edge.cli.eval import _load_agent
    from atod_edge.evaluate.evaluate import EvalConfig

    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32), ("auto", torch.float32)):
        policy = _load_agent("tiny-student", EvalConfig(precision=precision), scripted=False)
        assert {p.dtype for p in policy.model.parameters()} == {dtype}
    out = tmp_path / "bf16"
    assert main(["eval", "--model", "tiny-student", "--env", "household", "--episodes", "2",
                 "--set", "max_new_tokens=4", "--set", "precision=bf16", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["episodes"] == 2 and report["generated_tokens"] > 0
    capsys.readouterr()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert main(["eval", "--model", str(tmp_path / "m.gguf"), "--set", "precision=bf16",
                 "--out", str(tmp_path / "g")]) != 0
    assert "applies to PyTorch models" in one_error_line(capsys)


@pytest.mark.parametrize("argv, expected", [
    (["eval", "--model", "/no/such/model", "--env", "household"], "not found"),
    (["eval", "--env", "household"], "--model"),
    (["eval", "--model", "tiny-student", "--device", "gpu", "--env", "household"], "unknown device 'gpu'"),
    (["eval", "--policy", "expert", "--env", "nosuchenv"], "unknown env"),
    (["eval", "--policy", "expert", "--set", "episodes=0"], "episodes"),
    (["models", "info", "/no/such/model"], "not found"),
])
def test_user_errors_are_one_clean_line(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # nothing may be written into the working tree
    assert main(argv) != 0
    assert expected in one_error_line(capsys)


def test_models_list_info_and_shrink(atod_cache, tmp_path, capsys):
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "tiny-student" in listing and str(atod_cache) in listing and "smollm2-135m" in listing

    assert main(["models", "info", "tiny-teacher"]) == 0
    info = capsys.readouterr().out
    assert "layers" in info and " 4\n" in info and "chat_template      True" in info

    out = tmp_path / "cut"
    assert main(["models", "shrink", "tiny-teacher", "--keep-layers", "0,3", "--out", str(out)]) == 0
    assert "kept layers [0, 3] of 4" in capsys.readouterr().out
    assert main(["models", "info", str(out)]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("layers")] == ["2"]

    assert main(["models", "shrink", "tiny-student", "--keep-layers", "0,9", "--out", str(tmp_path / "bad")]) == 1
    assert "out of range" in one_error_line(capsys)


def test_config_show(capsys):
    assert main(["config", "show", "--stage", "eval", "--set", "split=unseen"]) == 0
    assert "split: unseen" in capsys.readouterr().out


# --- damaged model files: one line naming the file and the tensors, wherever a model loads ------


DAMAGE = {"renamed tensor": ("model.safetensors does not match its config.json", "missing: lm_head.weight, "
                             "model.embed_tokens.weight; unexpected: XXXXX.embed_tokens.weight"),
          "wrong shape": ("model.safetensors does not match its config.json",
                          "wrong shape: model.layers.0.mlp.down_proj.weight")}


@pytest.fixture(scope="module", params=list(DAMAGE))
def damaged(request, damage, tmp_path_factory):
    return request.param, damage(tmp_path_factory.mktemp("damaged") / "ckpt", request.param)


@pytest.mark.parametrize("command", ["eval", "models info", "export", "train"])
def test_a_damaged_checkpoint_is_refused_in_one_line(command, damaged, tmp_path, capsys, monkeypatch):
    how, ckpt = damaged
    monkeypatch.chdir(tmp_path)
    argv = {"eval": ["eval", "--model", str(ckpt), "--env", "household", "--episodes", "1"],
            "models info": ["models", "info", str(ckpt)],
            "export": ["export", str(ckpt), "--onnx", "--no-verify", "--out", str(tmp_path / "x")],
            "train": ["train", "--algo", "grpo", "--out", str(tmp_path / "run"), "--set", f"student={ckpt}",
                      "--set", "steps=1", "--set", "eval_episodes=0", "--set", "compare=false"]}[command]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "newly initialized" not in err
    [line] = [e for e in err.splitlines() if ": error: " in e]   # export also prints "loading ..." first
    for part in DAMAGE[how]:
        assert part in line, line
    assert str(ckpt / "model.safetensors") in line
    assert not (tmp_path / "x" / "onnx").exists()


def test_a_truncated_safetensors_file_is_one_line(atod_cache, tmp_path, capsys):
    from atod_edge.models.presets import resolve_model

    ckpt = shutil.copytree(resolve_model("tiny-student"), tmp_path / "torn")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    assert main(["eval", "--model", str(ckpt), "--env", "household", "--episodes", "1"]) == 1
    line = one_error_line(capsys)
    assert str(weights) in line and "header" in line
