"""A user's own environment, registered by import path (`--env pkg.module:Class`) from a module
outside the package: found in a subprocess and in every rank under torchrun, and each way the
path can be wrong is one line naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PLUGIN = '''
from atod_edge.envs import Env, StepResult


class Countdown(Env):
    """Say "tick" twice."""

    name = "countdown"
    max_turns = 4
    instructions = "Reply with the action tick."

    def reset(self, task):
        self.left = 2
        return f"Task {task.index}: tick {self.left} times."

    def step(self, action):
        valid = action.strip() == "tick"
        self.left -= valid
        done = self.left == 0
        return StepResult(f"{self.left} to go." if valid else "Nothing happens.", float(done), done,
                          {"valid": valid, "won": done, "score": float(done), "admissible": ["tick"]})

    def admissible_actions(self):
        return ["tick"]

    def expert_action(self):
        return "tick"


class NotAnEnv:
    name = "half"

    def reset(self, task):
        return ""
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """A directory on PYTHONPATH (not the working directory) holding the package `userenvs`."""
    root = tmp_path_factory.mktemp("plugins")
    (root / "userenvs").mkdir()
    (root / "userenvs" / "__init__.py").write_text("")
    (root / "userenvs" / "games.py").write_text(textwrap.dedent(PLUGIN))
    return root


def run(args, cwd, plugin_path, timeout=300):
    """A subprocess that finds the plugin only through PYTHONPATH (cwd is elsewhere)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(plugin_path))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_plugin_env_from_outside_the_package_runs_in_a_subprocess(plugin_path, tmp_path):
    out = tmp_path / "eval"
    result = run([sys.executable, "-m", "atod_edge.cli", "eval", "--policy", "expert", "--env",
                  "userenvs.games:Countdown", "--episodes", "3", "--out", str(out)], tmp_path, plugin_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["success"] == 1.0 and report["episodes"] == 3


@pytest.mark.parametrize("spec, message", [
    ("userenvs.nothere:Countdown", "env 'userenvs.nothere:Countdown': cannot import module 'userenvs.nothere'"),
    ("userenvs.games:Nope", "env 'userenvs.games:Nope': module 'userenvs.games' has no attribute 'Nope'"),
    ("userenvs.games:NotAnEnv", "env 'userenvs.games:NotAnEnv': NotAnEnv does not follow the env protocol "
                                "(missing step, admissible_actions, expert_action, tasks)"),
])
def test_a_wrong_plugin_path_is_one_line_naming_it(plugin_path, tmp_path, spec, message):
    result = run([sys.executable, "-m", "atod_edge.cli", "eval", "--policy", "expert", "--env", spec,
                  "--episodes", "1"], tmp_path, plugin_path)
    assert result.returncode == 1
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in err[0]


def test_a_plugin_env_trains_under_torchrun(plugin_path, tmp_path, atod_cache):
    """Every rank imports the plugin itself (torchrun's workers inherit PYTHONPATH, not the
    parent's imports): GRPO needs no teacher, so two ranks train the tiny student on it."""
    run_dir = tmp_path / "run"
    settings = ["algo=grpo", "env=userenvs.games:Countdown", "student=tiny-student", "steps=1",
                "tasks_per_step=2", "group_size=2", "max_turns=2", "max_new_tokens=4", "eval_episodes=0",
                "compare=false", "sample_episodes=2"]
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "-m", "atod_edge.cli", "train", "--out", str(run_dir),
                  *[a for s in settings for a in ("--set", s)]], tmp_path, plugin_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training grpo on userenvs.games:Countdown" in result.stdout
    [row] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["episodes"] == 4                      # 2 tasks x 2 rollouts, over both ranks
    samples = [json.loads(line) for line in (run_dir / "samples" / "step_000000.jsonl").read_text().splitlines()]
    assert samples and all(episode["env"] == "countdown" for episode in samples)
