"""Tests for train/pipeline.py (`atod-edge train`): the whole job with bootstrapped teacher and
student, its cache, and one-line errors for bad configs and mismatched tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train_fixtures import overrides

from atod_edge import cli
from atod_edge.models import resolve_model, train_tiny_tokenizer


def _flags(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


@pytest.mark.parametrize("args", [
    ["train", "--set", "steps=-1"],
    ["train", "--set", "algo=ppo"],
    ["train", "--set", "no_such_key=1"],
    ["train", "--set", "schedule.kappa_min=2"],     # above kappa_init
    ["train", "no-such-recipe"],
])
def test_malformed_config_exits_2_with_one_line(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("atod-edge train: error: ")
    assert not list(tmp_path.iterdir())   # no run directory was started


def test_recipe_that_is_not_valid_yaml_exits_2(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("steps: [1, 2\nalgo: atod\n")
    assert cli.main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid YAML" in err[0]


def test_teacher_with_another_tokenizer_is_refused(atod_cache, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(resolve_model("tiny-student"), teacher)
    other = train_tiny_tokenizer(["go to the kitchen", "take the apple", "search for the answer"] * 20, vocab_size=300)
    other.save_pretrained(teacher)   # same weights, a different vocabulary
    run_dir = tmp_path / "run"
    code = cli.main(["train", "--out", str(run_dir), "--set", f"teacher={teacher}", "--set", "student=tiny-student",
                     *_flags(overrides())])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("atod-edge train: error: teacher and student tokenizers differ")
    assert not run_dir.exists()


def test_train_bootstraps_trains_evaluates_and_reuses_the_cache(atod_cache, one_thread, tmp_path, capsys):
    settings = overrides(env="searchqa", steps=2, eval_episodes=2, compare=True, max_new_tokens=8,
                         bootstrap__teacher_preset="tiny-student", bootstrap__teacher_episodes=2,
                         bootstrap__teacher_epochs=1, bootstrap__student_episodes=1, bootstrap__student_epochs=1)
    first = tmp_path / "first"
    assert cli.main(["train", "--out", str(first), *_flags(settings)]) == 0
    out = capsys.readouterr().out
    assert "teacher: bootstrapping by SFT" in out and "student: bootstrapping by SFT" in out
    # the table: cold start, teacher, trained student, each with success, score and turns
    for row in ("| cold-start student |", "| teacher |", "| ATOD student |"):
        assert row in out
    report = json.loads((first / "report.json").read_text())
    assert set(report["eval"]) == {"cold-start student", "teacher", "ATOD student"}
    for summary in report["eval"].values():
        assert summary["episodes"] == 2 and 0.0 <= summary["success"] <= 1.0 and summary["turns"] > 0
    assert report["final_checkpoint"] == str(first / "checkpoints" / "step_000002")
    assert report["table"] in (first / "report.md").read_text()
    assert (first / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((first / "run.json").read_text())
    bootstrapped = [run["teacher"], run["student"]]
    assert all(str(atod_cache / "bootstrap") in path for path in bootstrapped)
    stamps = [(p / "model.safetensors").stat().st_mtime_ns for p in map(Path, bootstrapped)]

    # a second run finds both models (and their evaluations) in the cache: no SFT this time
    second = tmp_path / "second"
    assert cli.main(["train", "--out", str(second), *_flags(settings)]) == 0
    out = capsys.readouterr().out
    assert "bootstrapping" not in out
    assert "teacher: cached" in out and "student: cached" in out
    assert json.loads((second / "run.json").read_text())["student"] == run["student"]
    assert [(p / "model.safetensors").stat().st_mtime_ns for p in map(Path, bootstrapped)] == stamps
    again = json.loads((second / "report.json").read_text())["eval"]
    assert again["teacher"] == report["eval"]["teacher"]
    assert again["cold-start student"] == report["eval"]["cold-start student"]

    # and a third run into the same directory is refused: that is what --resume is for
    assert cli.main(["train", "--out", str(second), *_flags(settings)]) == 1
    assert "--resume" in capsys.readouterr().err


def test_unknown_device_is_refused_before_anything_starts(atod_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--set", "teacher_device=cudax", "--set", "teacher=tiny-student",
                     "--set", "student=tiny-student"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device 'cudax'" in err[0]
    assert not list(tmp_path.iterdir())


def test_student_cut_from_the_teacher_keeps_its_layers_and_tokenizer(atod_cache, one_thread):
    """bootstrap.student_from_teacher: the cold start begins as the teacher with some layers
    (then SFT); the cache key follows the teacher, so another teacher gives another student."""
    import torch

    from atod_edge.config import load_config
    from atod_edge.models import load_model
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.pipeline import ensure_model

    def config(teacher):
        return load_config(TrainConfig, None, [f"teacher={teacher}", "bootstrap.student_from_teacher=1",
                                               "bootstrap.student_episodes=1", "bootstrap.student_lr=0"])

    cfg = config(resolve_model("tiny-student"))
    student_dir = Path(ensure_model(cfg, "student", log=lambda *a: None))
    student, _ = load_model(student_dir)
    teacher, _ = load_model(cfg.teacher)
    assert student.config.num_hidden_layers == 1 and teacher.config.num_hidden_layers == 2
    # lr 0: the SFT changed nothing, so the student's one layer is the teacher's layer 1
    kept, source = student.model.layers[0].state_dict(), teacher.model.layers[1].state_dict()
    assert all(torch.equal(kept[k], source[k]) for k in source)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    other = Path(ensure_model(config(resolve_model("tiny-teacher")), "student", log=lambda *a: None))
    assert other != student_dir
