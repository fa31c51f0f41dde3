"""alfworld-engine (atod_edge/envs/alfworld_env.py, alfworld_problem.py): locally generated
ALFWorld-style tasks played in the real ALFWorld/TextWorld PDDL engine. Not the official ALFWorld splits."""

from __future__ import annotations

import json

import pytest

from atod_edge.envs import Task, env_class
from atod_edge.envs.alfworld_env import AlfWorldEngineEnv, game_folder
from atod_edge.envs.alfworld_problem import FAMILIES, generate_problem

EVAL_TASKS = 3


@pytest.fixture(scope="session")
def alfworld_games(tmp_path_factory):
    """A private games cache for the session, or a skip when the optional extra is missing."""
    pytest.importorskip("alfworld", reason="optional extra atod-edge[alfworld] (alfworld) not installed")
    pytest.importorskip("fast_downward", reason="optional extra atod-edge[alfworld]: textworld[pddl] "
                        "(fast-downward-textworld) not installed")
    path = tmp_path_factory.mktemp("alfworld-games")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATOD_EDGE_GAMES_DIR", str(path))
        yield path


def test_expert_wins_eval_tasks(alfworld_games):
    env = AlfWorldEngineEnv()
    for task in env.tasks("eval", EVAL_TASKS):
        observation = env.reset(task)
        assert "Your task is to:" in observation and "Welcome to TextWorld" not in observation
        rewards = []
        while True:
            action = env.expert_action()
            assert action in env.admissible_actions(), (task, action)
            result = env.step(action)
            assert result.info["valid"], (task, action, result.observation)
            rewards.append(result.reward)
            if result.done:
                break
        assert result.info["won"] and result.info["score"] == 1.0, task
        assert rewards[-1] == 1.0 and all(r == 0.0 for r in rewards[:-1])
        game = json.loads((game_folder(task) / "game.tw-pddl").read_text())
        assert game["solvable"] and game["walkthrough"] and "not an official" in game["note"]


def test_invalid_commands_are_safe_and_expert_recovers(alfworld_games):
    env = AlfWorldEngineEnv()
    env.reset(env.tasks("eval", 1)[0])
    before = env.admissible_actions()
    for action in ("dance wildly", "", "x" * 5000, None, "put mug in moon", "help"):
        result = env.step(action)  # type: ignore[arg-type]
        assert result.info["valid"] is False and result.info["feedback"] and result.reward == 0.0
        assert env.admissible_actions() == before
    # wander off the expert's path (go somewhere else first), then let the expert finish
    detour = next(a for a in before if a.startswith("go to") and a != env.expert_action())
    assert env.step(detour).info["valid"]
    while True:
        result = env.step(env.expert_action())
        if result.done:
            break
    assert result.info["won"]


def test_same_seed_same_problem_and_all_families_drawn():
    pytest.importorskip("alfworld", reason="optional extra atod-edge[alfworld] (alfworld) not installed")
    first = generate_problem(1234, "eval")
    assert generate_problem(1234, "eval") == first
    assert generate_problem(1235, "eval") != first
    families = {generate_problem(seed, "train")["family"] for seed in range(60)}
    assert families == set(FAMILIES)


def test_unseen_split_uses_held_out_scenes():
    pytest.importorskip("alfworld", reason="optional extra atod-edge[alfworld] (alfworld) not installed")
    import alfworld.gen.constants as constants

    for seed in range(20):
        assert generate_problem(seed, "unseen")["scene"] in constants.TEST_SCENE_NUMBERS
        assert generate_problem(seed, "train")["scene"] in constants.TRAIN_SCENE_NUMBERS


def test_cached_game_is_reused_and_labelled(alfworld_games):
    task = Task("alfworld-engine", "eval", 0)
    AlfWorldEngineEnv().reset(task)
    path = game_folder(task) / "game.tw-pddl"
    stamp = path.stat().st_mtime_ns
    env = AlfWorldEngineEnv()
    first = env.reset(task)
    assert path.stat().st_mtime_ns == stamp and env.reset(task) == first
    assert "not the official" in AlfWorldEngineEnv.description
    assert "NOT the official ALFWorld splits" in (AlfWorldEngineEnv.__doc__ or "")


def test_import_path_and_scripted_rollout(alfworld_games):
    from atod_edge.rollout.runner import run_scripted

    cls = env_class("atod_edge.envs.alfworld_env:AlfWorldEngineEnv")
    episodes = run_scripted("expert", cls, cls().tasks("eval", 2))
    assert [e.success for e in episodes] == [True, True]
