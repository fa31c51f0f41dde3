"""Tests for train/pipeline.py (`atod-edge train`): the whole job with bootstrapped teacher and
student, its cache, and one-line errors for bad configs and mismatched tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train_fixtures import metric_rows, overrides, run_cli

from atod_edge.cli import main as cli
from atod_edge.models.presets import resolve_model
from atod_edge.models.tiny import train_tiny_tokenizer


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
    # teacher=auto: the default recipe's teacher is the zoo's; this tests the SFT bootstrap path
    settings = overrides(env="searchqa", steps=2, eval_episodes=2, compare=True, max_new_tokens=8, teacher="auto",
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
    # the trained student against each other row, paired over the same tasks
    assert report["eval"]["ATOD student"]["outcomes"].keys() == report["eval"]["teacher"]["outcomes"].keys()
    assert report["paired"].count("paired over the same 2 tasks") == 2 and report["paired"] in out
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
    from atod_edge.models.loading import load_model
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


def test_bootstrap_sft_runs_in_the_runs_precision_and_caches_by_it(atod_cache, one_thread):
    """A run with precision=bf16 cold-starts its student under bf16 autocast too (its SFT config
    says so), in another cache entry than the default (fp32 on CPU), which stays where it was."""
    import yaml

    from atod_edge.config import load_config
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.pipeline import _bootstrap_dir, ensure_model

    def config(*extra):
        return load_config(TrainConfig, None, ["teacher=tiny-teacher", "bootstrap.student_episodes=1",
                                               "bootstrap.student_lr=0", *extra])

    default = _bootstrap_dir(config(), "student")
    assert _bootstrap_dir(config("precision=fp32"), "student") not in (default, _bootstrap_dir(config("precision=bf16"), "student"))
    bf16_dir = Path(ensure_model(config("precision=bf16"), "student", log=lambda *a: None))
    assert bf16_dir != default
    sft_config = yaml.safe_load((bf16_dir.with_name(bf16_dir.name + ".work") / "config.yaml").read_text())
    assert sft_config["precision"] == "bf16"


# --- train --resume through the CLI -------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(atod_cache, small_teacher, tmp_path_factory):
    """A 2-step run of `atod-edge train` (in-process), finished: checkpoints 1 and 2, report.json."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    assert cli.main(["train", "--out", str(run_dir), "--set", "student=tiny-student", "--set",
                     f"teacher={small_teacher}", *_flags(overrides(steps=2))]) == 0
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in metric_rows(run_dir)]


@pytest.mark.parametrize("missing, message", [
    ("config.yaml", "not a run directory (no config.yaml)"),
    ("run.json", "run.json is missing; cannot tell which student it started from"),
])
def test_resume_without_its_files_is_one_line(finished_run, tmp_path, capsys, missing, message):
    run_dir = _copy(finished_run, tmp_path)
    (run_dir / missing).unlink()
    assert cli.main(["train", "--resume", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(run_dir) in err[0], err


def test_resume_refuses_a_changed_training_setting_and_records_a_longer_run(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    before = (run_dir / "metrics.jsonl").read_text()
    assert cli.main(["train", "--resume", str(run_dir), "--set", "lr=0.5", "--set", "group_size=4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot change group_size, lr of a run under way" in err[0], err
    assert "its config.yaml has group_size=2" in err[0]
    assert (run_dir / "metrics.jsonl").read_text() == before           # nothing ran

    # more steps is a change a run may take: it continues, and config.yaml says so
    assert cli.main(["train", "--resume", str(run_dir), "--set", "steps=3", "--set", "eval_batch_episodes=4"]) == 0
    out = capsys.readouterr().out
    assert "resuming with steps 2 -> 3, eval_batch_episodes 64 -> 4" in out
    assert f"resuming {run_dir} after step 2" in out
    assert _steps(run_dir) == [0, 1, 2]
    assert "steps: 3" in (run_dir / "config.yaml").read_text().splitlines()
    assert (run_dir / "checkpoints" / "step_000003" / "model.safetensors").is_file()


def test_resume_changeable_keys_are_train_settings_that_leave_training_as_it_was():
    """Every RESUME_CHANGEABLE key is a TrainConfig key; changing one on resume is reported,
    changing a training setting (grad_norm_every's extra passes draw dropout's random numbers
    wherever dropout is on) is refused in one line naming it."""
    from dataclasses import fields, replace

    from atod_edge.errors import UserError
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.pipeline import RESUME_CHANGEABLE, _resume_changes

    assert set(RESUME_CHANGEABLE) <= {f.name for f in fields(TrainConfig)}
    assert {"eval_batch_episodes"} <= set(RESUME_CHANGEABLE)
    saved = TrainConfig()
    assert _resume_changes(saved, replace(saved, eval_batch_episodes=8, eval_every=5), "RUN") == [
        "eval_every 0 -> 5", "eval_batch_episodes 64 -> 8"]
    for key, value in (("grad_norm_every", 1), ("max_prompt_tokens", 100)):
        with pytest.raises(UserError, match=f"cannot change {key} of a run under way"):
            _resume_changes(saved, replace(saved, **{key: value}), "RUN")


def test_resume_after_a_kill_in_the_last_checkpoint_finishes_the_run(atod_cache, small_teacher, tmp_path, capsys):
    run_dir = tmp_path / "killed"
    args = ["train", "--out", str(run_dir), "--set", "student=tiny-student", "--set", f"teacher={small_teacher}",
            *_flags(overrides(steps=2))]
    killed = run_cli(args, cwd=tmp_path, ATOD_EDGE_TEST_KILL_IN_CHECKPOINT="2")   # the last step's checkpoint
    assert killed.returncode == -9, killed.stderr
    assert not (run_dir / "report.json").exists()
    assert cli.main(["train", "--resume", str(run_dir)]) == 0
    assert f"resuming {run_dir} after step 1" in capsys.readouterr().out
    assert _steps(run_dir) == [0, 1]                                   # step 1 redone once, not twice
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["final_checkpoint"] == str(run_dir / "checkpoints" / "step_000002")


def test_resume_of_a_run_killed_after_its_last_checkpoint_writes_the_report(finished_run, tmp_path, capsys):
    """Killed after the last checkpoint, before the report: the run is complete on disk but for
    report.json (what the pipeline writes after train() returns); resume trains nothing more."""
    run_dir = _copy(finished_run, tmp_path)
    (run_dir / "report.json").unlink()
    before = (run_dir / "metrics.jsonl").read_text()
    assert cli.main(["train", "--resume", str(run_dir)]) == 0
    assert f"resuming {run_dir} after step 2" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert json.loads((run_dir / "report.json").read_text())["final_checkpoint"].endswith("step_000002")


def test_paired_lines_pair_task_by_task():
    from atod_edge.train.pipeline import paired_lines

    cold = {"outcomes": {"t0": 0, "t1": 0, "t2": 1, "t3": 0}}
    teacher = {"outcomes": {"t0": 1, "t1": 1, "t2": 1, "t3": 1}}
    student = {"outcomes": {"t3": 1, "t2": 1, "t1": 1, "t0": 0}}     # another order: paired by task id
    lines = paired_lines([("cold-start student", cold), ("teacher", teacher), ("ATOD student", student)])
    assert lines[0].startswith("- ATOD student - cold-start student: +50.0 points")
    assert lines[1].startswith("- ATOD student - teacher: -25.0 points")
    assert all("paired over the same 4 tasks" in line for line in lines)
    assert paired_lines([("cold-start student", {}), ("ATOD student", student)]) == []   # no outcomes kept

