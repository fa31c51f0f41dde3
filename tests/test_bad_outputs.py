"""Outputs, runs and the command line under bad conditions (issue 30), through the real CLI in a
subprocess on the tiny models: every case ends in exit code != 0 with one line on stderr naming
the problem (no traceback), and whatever existed before is intact afterwards.

    the output rule    --out may be new or an earlier output of the same kind (io.check_output);
                       a foreign directory, a file, a run dir or an unwritable place is refused
                       before any work; --force replaces a foreign directory
    the run lock       a second writer on a run or sft dir is refused, naming the holder's pid
    atomic results     eval replaces its files only once the new ones are complete
    a full disk        a file size limit (RLIMIT_FSIZE, EFBIG: as ENOSPC) while writing a model or
                       an evaluation: one line, the earlier output intact
    resume             a torn newest checkpoint is skipped (said so), a damaged run.json or
                       config.yaml is one line, steps below those done are refused, Ctrl-C says
                       how to resume
    bounds             inf, absurd counts and seeds, negative episodes, a name like a\\b
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atod_edge.io import run_lock

FOREIGN = "thesis.txt"


def cli(args: list[str], cwd: Path, timeout: float = 240, file_size_limit: int | None = None):
    """`atod-edge ARGS` in a subprocess (the session's ATOD_EDGE_CACHE is inherited); with
    file_size_limit, under RLIMIT_FSIZE with SIGXFSZ ignored, so a write past it fails with EFBIG."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "atod_edge.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if file_size_limit else None)


def one_line(proc, rc: int | None = None) -> str:
    """The single stderr line of a refused command (asserting there is one, and no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.returncode == (rc if rc is not None else proc.returncode) and proc.returncode != 0
    return lines[0]


def last_line(proc) -> str:
    """The error line that ends a command that had started work (progress lines may precede it)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself)."""
    path = Path(path)
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def places(tmp_path):
    """A foreign directory (a user's thesis in it), a file, and something that looks like a run."""
    foreign = tmp_path / "DIR"
    foreign.mkdir()
    (foreign / FOREIGN).write_text("three years of work\n")
    file = tmp_path / "FILE"
    file.write_text("notes\n")
    run = tmp_path / "RUN"
    run.mkdir()
    (run / "config.yaml").write_text("steps: 16\n")
    (run / "run.json").write_text('{"student": "tiny-student"}\n')
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    return {"DIR": foreign, "FILE": file, "RUN": run}


REFUSED = [   # (command, the text its one line holds)
    (["sft", "--model", "tiny-student", "--episodes", "2", "--out", "DIR"], "is a non-empty directory"),
    (["sft", "--model", "tiny-student", "--episodes", "2", "--out", "FILE"], "is a file"),
    (["sft", "--model", "tiny-student", "--episodes", "2", "--out", "RUN"], "holds a training run"),
    (["eval", "--policy", "expert", "--episodes", "2", "--out", "FILE"], "is a file"),
    (["eval", "--policy", "expert", "--episodes", "2", "--out", "DIR"], "is a non-empty directory"),
    (["eval", "--policy", "expert", "--episodes", "2", "--out", "RUN"], "holds a training run"),
    (["eval", "--policy", "expert", "--episodes", "2", "--out", "/proc/atod-edge-test/out"], "cannot write in"),
    (["models", "shrink", "tiny-student", "--keep-layers", "0", "--out", "DIR"], "is a non-empty directory"),
    (["models", "average", "tiny-student", "tiny-student", "--out", "RUN"], "holds a training run"),
    (["export", "tiny-student", "--gguf", "--no-verify", "--out", "DIR"], "is a non-empty directory"),
    (["train", "--set", "student=tiny-student", "--out", "DIR"], "is a non-empty directory"),
    (["train", "--set", "student=tiny-student", "--out", "FILE/run"], "is a file, not a directory"),
    (["train", "--set", "student=tiny-student", "--out", "RUN"], "--resume"),
]


@pytest.mark.parametrize("argv,expected", REFUSED, ids=[" ".join(a[:1] + a[-2:]) for a, _ in REFUSED])
def test_out_is_checked_before_any_work_and_nothing_is_lost(argv, expected, places, tmp_path):
    before = {name: snapshot(path) for name, path in places.items()}
    started = time.perf_counter()
    line = one_line(cli(argv, tmp_path))
    assert expected in line, line
    assert time.perf_counter() - started < 60   # refused up front, not after the work
    assert {name: snapshot(path) for name, path in places.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DIR", "FILE", "RUN"]   # no temporaries


def test_zoo_entry_over_a_foreign_directory_is_refused(places, tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(places["DIR"], zoo / "mine")
    (tmp_path / "chain.txt").write_text("atod-edge sft --out x\n")
    line = one_line(cli(["models", "publish", "tiny-student", "--name", "mine", "--chain", "chain.txt",
                         "--zoo", zoo, "--episodes", "2"], tmp_path))
    assert "zoo entry" in line and "non-empty directory" in line
    assert (zoo / "mine" / FOREIGN).read_text() == "three years of work\n"


def test_eval_replaces_an_earlier_evaluation_and_force_replaces_a_foreign_dir(places, tmp_path):
    out = tmp_path / "E"
    assert cli(["eval", "--policy", "expert", "--episodes", "3", "--out", out], tmp_path).returncode == 0
    assert json.loads((out / "report.json").read_text())["episodes"] == 3
    assert cli(["eval", "--policy", "random", "--episodes", "2", "--out", out], tmp_path).returncode == 0
    report = json.loads((out / "report.json").read_text())
    assert report["episodes"] == 2 and report["policy"] == "random"
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 2   # replaced, not appended
    proc = cli(["eval", "--policy", "expert", "--episodes", "2", "--out", "DIR", "--force"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in places["DIR"].iterdir()) == ["episodes.jsonl", "report.json"]


def test_eval_with_a_full_disk_keeps_the_earlier_results(tmp_path):
    out = tmp_path / "E"
    assert cli(["eval", "--policy", "expert", "--episodes", "20", "--out", out], tmp_path).returncode == 0
    before = snapshot(out)
    proc = cli(["eval", "--policy", "random", "--episodes", "20", "--out", out], tmp_path, file_size_limit=2000)
    line = last_line(proc)
    assert str(out.name) in line and "file size limit" in line
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["E"]   # no temporaries left


def test_eval_compare_loads_b_before_playing_a(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    started = time.perf_counter()
    line = one_line(cli(["eval", "--model", "tiny-student", "--compare", broken, "--episodes", "2",
                         "--out", tmp_path / "C"], tmp_path))
    assert "broken" in line                       # and no "eval A" progress line: A was never played
    assert not (tmp_path / "C").exists() and time.perf_counter() - started < 120


def test_sft_with_a_full_disk_keeps_the_earlier_model(atod_cache, tmp_path):
    from atod_edge.models.presets import resolve_model

    out = tmp_path / "M"
    shutil.copytree(resolve_model("tiny-student"), out)   # an earlier model at --out
    before = snapshot(out)
    proc = cli(["sft", "--model", "tiny-student", "--demos", "expert", "--episodes", "1", "--set", "epochs=1",
                "--set", "eval_episodes=0", "--out", out], tmp_path, file_size_limit=1 << 20)
    line = last_line(proc)
    assert "file size limit" in line and "cannot write" in line and str(out) in line and "--resume" in line
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporaries left


@pytest.fixture
def run_copy(trained_run, small_teacher, tmp_path):
    """A copy of the session's 8-step trained run with the run.json `atod-edge train` writes."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "run.json").write_text(json.dumps({"teacher": str(small_teacher), "student": "tiny-student",
                                              "recipe": "household"}))
    return run


def test_a_second_writer_is_refused_naming_the_holder(run_copy, tmp_path):
    before = snapshot(run_copy)
    with run_lock(run_copy):
        line = one_line(cli(["train", "--resume", run_copy], tmp_path))
    assert f"pid {os.getpid()}" in line and "in use" in line
    assert snapshot(run_copy) == before

    from atod_edge.config import dump_yaml
    from atod_edge.train.config import SFTConfig

    work = tmp_path / "M.work"   # an interrupted sft run's records
    work.mkdir()
    (work / "config.yaml").write_text(dump_yaml(SFTConfig(model="tiny-student", out=str(tmp_path / "M"))))
    (work / "data.json").write_text("{}")
    (work / "metrics.jsonl").write_text("")
    with run_lock(work):
        line = one_line(cli(["sft", "--resume", tmp_path / "M"], tmp_path))
    assert f"pid {os.getpid()}" in line


@pytest.mark.parametrize("damage,expected", [
    ("run.json", "run.json is damaged"),
    ("config.yaml", "config.yaml is damaged"),
    ("steps", "fewer than the 8 steps"),
])
def test_resume_of_a_damaged_or_shrunk_run_is_one_line(damage, expected, run_copy, tmp_path):
    args = ["train", "--resume", run_copy]
    if damage == "steps":
        args += ["--set", "steps=3"]   # the run has done 8: config.yaml must keep saying so
    else:
        (run_copy / damage).write_text('{"teacher": ' if damage == "run.json" else "")
    before = snapshot(run_copy)
    assert expected in one_line(cli(args, tmp_path))
    assert snapshot(run_copy) == before


def test_resume_skips_a_torn_checkpoint_and_ctrl_c_says_how_to_resume(run_copy, tmp_path):
    from atod_edge.train.checkpoint import checkpoint_problem, latest_checkpoint

    torn = run_copy / "checkpoints" / "step_000008" / "model.safetensors"
    torn.write_bytes(torn.read_bytes()[:5000])
    proc = subprocess.Popen([sys.executable, "-m", "atod_edge.cli", "train", "--resume", str(run_copy),
                             "--set", "steps=200"], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    stdout = _read_until(proc, " after step ", timeout=180)
    assert "skipping checkpoint step_000008: model.safetensors" in stdout
    assert f"resuming {run_copy} after step 4" in stdout
    time.sleep(1.0)   # inside the steps
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    hint = [line for line in stderr.splitlines() if line.startswith("train: interrupted")]
    assert len(hint) == 1 and f"`atod-edge train --resume {run_copy}`" in hint[0]
    # an intact checkpoint stays to resume from: step 4, or a newer one the resumed run wrote before the
    # Ctrl-C (a fast machine gets there within the second, and the checkpoint rotation then drops step 4)
    newest = latest_checkpoint(run_copy)
    assert newest is not None and newest[0] >= 4 and checkpoint_problem(newest[1]) is None


def _read_until(proc, text: str, timeout: float) -> str:
    """The child's stdout up to and including the first line holding `text`."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=1.0):
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
            if text in line:
                return seen
    proc.kill()
    raise AssertionError(f"no {text!r} in the output: {seen}\n{proc.stderr.read()}")


BOUNDS = [   # (command, the text its one line holds): each refused before any work
    (["train", "--set", "lr=inf"], "must be a finite number"),
    (["config", "show", "--set", "lr=.nan"], "must be a finite number"),
    (["config", "show", "--set", "steps=100000000000"], "'steps'"),
    (["config", "show", "--set", "steps=100000", "--set", "tasks_per_step=100"], "training tasks"),
    (["config", "show", "--set", "seed=99999999999999999999"], "'seed'"),
    (["config", "show", "--stage", "eval", "--set", "max_new_tokens=1000000000"], "'max_new_tokens'"),
    (["config", "show", "--stage", "sft", "--set", "epochs=1e12"], "'epochs'"),
    (["eval", "--policy", "expert", "--episodes", "2000000000"], "'episodes'"),
    (["models", "publish", "tiny-student", "--name", "ok", "--chain", "chain.txt", "--episodes", "-5",
      "--zoo", "zoo"], "'episodes'"),
    (["models", "publish", "tiny-student", "--name", "a\\b", "--chain", "chain.txt", "--zoo", "zoo"],
     "zoo name 'a\\b'"),
]


@pytest.mark.parametrize("argv,expected", BOUNDS, ids=[f"{a[0]} {expected}" for a, expected in BOUNDS])
def test_absurd_values_are_one_line(argv, expected, tmp_path):
    (tmp_path / "chain.txt").write_text("atod-edge sft --out x\n")
    started = time.perf_counter()
    assert expected in one_line(cli(argv, tmp_path))
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "zoo").exists() and not (tmp_path / "runs").exists()
