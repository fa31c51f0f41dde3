"""The trainer's env guards (issue 30's leftovers): `env_step_timeout` and `max_prompt_tokens` reach
every rollout of `atod-edge train` (training steps and in-training evaluations), as they do
evaluation's. An env that hangs past the deadline ends only its own episode, recorded as an env
error, and the run goes on; a step whose every episode hung stops the run in one line."""

from __future__ import annotations

import textwrap

import pytest

from atod_edge.errors import UserError

HANGING = '''
import time
from atod_edge.envs.household.env import HouseholdEnv

RESETS = [0]


class HangEveryOther(HouseholdEnv):
    """step() hangs in every other episode (counted by reset): each group of 2, each pair of eval
    episodes, has one episode that hangs and one that plays."""

    name = "hang-every-other"

    def reset(self, task):
        self.hangs = RESETS[0] % 2 == 0
        RESETS[0] += 1
        return super().reset(task)

    def step(self, action):
        if self.hangs:
            time.sleep(3600)
        return super().step(action)


class AlwaysHang(HouseholdEnv):
    name = "always-hang"

    def step(self, action):
        time.sleep(3600)
'''

#: a grpo run (no teacher) of 1 task x 2 rollouts x 2 turns per step
TINY = ["algo=grpo", "tasks_per_step=1", "group_size=2", "max_turns=2", "max_new_tokens=6", "micro_batch=16",
        "sample_episodes=2", "checkpoint_every=1", "keep_checkpoints=1", "compare=false", "grad_norm_every=0"]


@pytest.fixture
def hanging(tmp_path, monkeypatch):
    """The module above, importable as hang_envs30."""
    (tmp_path / "hang_envs30.py").write_text(textwrap.dedent(HANGING))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "hang_envs30"


def _train(settings: list[str], run_dir):
    from atod_edge.config import load_config
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.trainer import train

    return train(load_config(TrainConfig, None, TINY + settings), run_dir, "tiny-student", None, log=lambda *a: None)


def _samples(run_dir, step: int):
    from atod_edge.rollout.episode import read_episodes

    episodes, skipped = read_episodes(run_dir / "samples" / f"step_{step:06d}.jsonl")
    assert skipped == 0
    return episodes


def test_a_hung_env_ends_its_episode_and_the_run_goes_on(atod_cache, one_thread, hanging, tmp_path):
    import signal

    from atod_edge.io import read_jsonl

    run_dir = tmp_path / "run"
    final = _train([f"env={hanging}:HangEveryOther", "steps=2", "env_step_timeout=0.5", "eval_every=1",
                    "eval_episodes=2", "eval_batch_episodes=2"], run_dir)
    assert final.name == "step_000002"
    for step in (0, 1):
        errors = [ep.meta.get("error", "") for ep in _samples(run_dir, step)]
        assert len(errors) == 2 and sum("took longer than 0.5 s" in e for e in errors) == 1, errors
    rows, _ = read_jsonl(run_dir / "metrics.jsonl")
    [evaluation] = [r for r in rows if "eval_success" in r]    # the in-training evaluation after step 1
    assert evaluation["eval_errors"] == 1 and "took longer than 0.5 s" in evaluation["eval_first_error"]
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_step_whose_every_episode_hung_stops_the_run_in_one_line(atod_cache, one_thread, hanging, tmp_path):
    with pytest.raises(UserError) as error:
        _train([f"env={hanging}:AlwaysHang", "steps=1", "env_step_timeout=0.5", "eval_episodes=0"], tmp_path / "run")
    message = str(error.value)
    assert "\n" not in message
    assert "step 1: every one of its 2 episodes ended in an env error" in message
    assert "took longer than 0.5 s" in message


def test_max_prompt_tokens_and_the_timeout_reach_every_rollout(atod_cache, one_thread, tmp_path, monkeypatch):
    """Training rollouts and in-training evaluations get both settings; prompts are cut to the budget."""
    import atod_edge.rollout.runner as runner

    calls = []
    real = runner.run_episodes

    def spy(*args, **kwargs):
        calls.append((kwargs.get("env_step_timeout"), kwargs.get("max_prompt_tokens")))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_episodes", spy)
    run_dir = tmp_path / "run"
    budget = 120
    _train(["env=household", "steps=2", "env_step_timeout=7", f"max_prompt_tokens={budget}", "eval_every=1",
            "eval_episodes=2", "eval_batch_episodes=2"], run_dir)
    assert calls == [(7.0, budget)] * 3     # step 0, the evaluation after it, step 1
    episodes = _samples(run_dir, 0) + _samples(run_dir, 1)
    assert all(len(turn.prompt_ids) <= budget for ep in episodes for turn in ep.turns)
    assert any(ep.meta.get("prompt_cuts") for ep in episodes)   # household prompts are longer than that
