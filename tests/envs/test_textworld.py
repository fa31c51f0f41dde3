"""TextWorld adapters (atod_edge/envs/textworld_env.py) on real generated games.

Games are generated once per test session into a temporary games folder (about 2 s a game).
"""

from __future__ import annotations

import json

import pytest

from atod_edge.envs import Task, env_class
from atod_edge.envs.textworld_env import TextWorldCoinEnv, TextWorldCookingEnv, TextWorldEnv, TextWorldTreasureEnv, clean_observation

ADAPTERS = [TextWorldCookingEnv, TextWorldCoinEnv, TextWorldTreasureEnv]
EVAL_TASKS = 2


def test_clean_observation_strips_banner_prompt_and_restart_question():
    raw = ("\n\n   ________  __\n  |        \\|  \\\n   \\$$$$$$$$| $$\n\n"
           "You are hungry! Check the cookbook.\n\n-= Kitchen =-\nYou're now in a kitchen.\n\n"
           ">                                       -= Kitchen =-0/1")
    assert clean_observation(raw, strip_banner=True) == (
        "You are hungry! Check the cookbook.\n\n-= Kitchen =-\nYou're now in a kitchen.")
    end = ("\nYou eat the meal.\n\n\n\n      *** The End ***\n\nYou scored 5 out of a possible 5.\n\n\n"
           "Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?\n>     ")
    assert clean_observation(end) == ("You eat the meal.\n\n*** The End ***\n\n"
                                      "You scored 5 out of a possible 5.")


@pytest.fixture(scope="session")
def games_dir(tmp_path_factory):
    """A private games cache for the session (generation is what these tests exercise)."""
    pytest.importorskip("textworld", reason="optional extra atod-edge[envs] (textworld) not installed")
    path = tmp_path_factory.mktemp("textworld-games")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATOD_EDGE_GAMES_DIR", str(path))
        yield path


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: c.name)
def test_expert_wins_eval_tasks(games_dir, cls):
    env = cls()
    for task in env.tasks("eval", EVAL_TASKS):
        observation = env.reset(task)
        assert observation and "$$" not in observation and not observation.rstrip().endswith(">")
        rewards = []
        while True:
            action = env.expert_action()
            assert action in env.admissible_actions()
            result = env.step(action)
            assert result.info["valid"], (task, action, result.observation)
            rewards.append(result.reward)
            if result.done:
                break
        assert result.info["won"] and result.info["score"] == 1.0, task
        assert rewards[-1] == 1.0 and all(r == 0.0 for r in rewards[:-1])  # sparse, at the end
        assert len(rewards) < cls.max_turns


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: c.name)
def test_invalid_commands_are_safe_steps(games_dir, cls):
    env = cls()
    env.reset(env.tasks("eval", 1)[0])
    before = env.admissible_actions()
    for action in ("dance wildly", "", "   ", "x" * 5000, None, 42, "take the moon"):
        result = env.step(action)  # type: ignore[arg-type]
        assert result.info["valid"] is False and result.info["feedback"]
        assert result.reward == 0.0 and not result.info["won"]
        assert env.admissible_actions() == before  # not sent to the game: nothing changed
    # valid commands still work after the garbage, and spelling/case is normalised
    expert = env.expert_action()
    assert env.step("  " + expert.upper() + " ").info["valid"]


def test_turn_limit_ends_the_episode(games_dir):
    env = TextWorldCoinEnv()
    env.reset(env.tasks("eval", 1)[0])
    results = [env.step("look") for _ in range(env.max_turns)]
    assert [r.done for r in results] == [False] * (env.max_turns - 1) + [True]
    assert results[-1].reward == 0.0 and not results[-1].info["won"]
    after = env.step("look")
    assert after.done and after.info["valid"] is False


def test_same_seed_same_game_and_splits_differ(games_dir, tmp_path, monkeypatch):
    task = Task("textworld-cooking", "eval", 0)
    env = TextWorldCookingEnv()
    first = env.reset(task)
    first_game = json.loads((TextWorldCookingEnv.game_folder(task) / "game.json").read_text())
    first_plan = env.expert_action()

    monkeypatch.setenv("ATOD_EDGE_GAMES_DIR", str(tmp_path))  # a fresh cache: regenerate
    again = TextWorldCookingEnv()
    assert again.reset(task) == first
    regenerated = TextWorldCookingEnv.game_folder(task) / "game.json"
    assert str(tmp_path) in str(regenerated)
    assert json.loads(regenerated.read_text()) == first_game
    assert again.expert_action() == first_plan

    assert again.reset(Task("textworld-cooking", "train", 0)) != first


def test_games_are_cached_and_reused(games_dir):
    task = Task("textworld-treasure", "eval", 0)
    TextWorldTreasureEnv().reset(task)
    folder = TextWorldTreasureEnv.game_folder(task)
    stamp = (folder / "game.z8").stat().st_mtime_ns
    TextWorldTreasureEnv().reset(task)
    assert (folder / "game.z8").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in folder.iterdir()) == ["game.json", "game.z8"]
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # no leftovers


def test_unseen_split_uses_other_settings():
    for cls in ADAPTERS:
        assert cls.settings["train"] == cls.settings["eval"] != cls.settings["unseen"]


def test_import_path_and_scripted_rollout(games_dir):
    from atod_edge.rollout.runner import run_scripted

    cls = env_class("atod_edge.envs.textworld_env:TextWorldCookingEnv")
    assert cls is TextWorldCookingEnv and issubclass(cls, TextWorldEnv)
    episodes = run_scripted("expert", cls, cls().tasks("eval", 2))
    assert [e.success for e in episodes] == [True, True]
    assert all(e.reward == 1.0 and e.turns and e.turns[0].admissible for e in episodes)


def test_train_two_steps_on_textworld_cooking(games_dir, atod_cache, tmp_path):
    """The protocol is the test: rollout, teacher scoring and the ATOD update run unchanged."""
    from atod_edge.config import load_config
    from atod_edge.io import read_jsonl
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.trainer import train

    cfg = load_config(TrainConfig, None, [
        "env=textworld-cooking", "steps=2", "tasks_per_step=1", "group_size=2", "max_turns=3",
        "max_new_tokens=8", "eval_episodes=0", "compare=false", "lr=1e-4", "checkpoint_every=1"])
    final = train(cfg, tmp_path / "run", "tiny-student", "tiny-student", log=lambda *a: None)
    rows, skipped = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert skipped == 0 and [r["step"] for r in rows] == [0, 1]
    assert all(r["tokens"] > 0 and r["episode_len"] <= 3 for r in rows)
    assert (final / "config.json").is_file()
