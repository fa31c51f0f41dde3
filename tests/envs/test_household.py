"""Tests for the built-in ALFWorld-style household environment (atod_edge/envs/household.py)."""

from __future__ import annotations

import random

import pytest

from atod_edge.envs import Task, make_env
from atod_edge.envs.household import (
    FAMILIES, OBJECTS, RECEPTACLES, SEEN_OBJECTS, UNSEEN_ONLY_OBJECTS, HouseholdEnv,
)
from atod_edge.errors import UserError


def run_expert(env: HouseholdEnv, task: Task) -> tuple[str, list[str], bool]:
    """Play one episode with the expert; return the reset text, the actions and whether it won."""
    first = env.reset(task)
    actions = []
    while not env.done:
        action = env.expert_action()
        actions.append(action)
        result = env.step(action)
        assert result.info["valid"], f"expert action {action!r} invalid in {task.task_id}"
    return first, actions, result.info["won"]


def run_random(env: HouseholdEnv, task: Task, rng: random.Random) -> bool:
    env.reset(task)
    result = None
    while result is None or not result.done:
        result = env.step(rng.choice(env.admissible_actions()))
    return result.info["won"]


def objects_in_room(env: HouseholdEnv) -> set[str]:
    return set(env.obj_kind.values())


def test_registered_and_protocol():
    env = make_env("household")
    assert isinstance(env, HouseholdEnv)
    assert env.name == "household" and env.max_turns == 30
    assert "go to" in env.instructions and "put" in env.instructions


def test_expert_solves_eval_tasks():
    env = HouseholdEnv()
    tasks = env.tasks("eval", 100)
    results = [run_expert(env, t) for t in tasks]
    success = sum(won for _, _, won in results) / len(tasks)
    assert success >= 0.99
    # trajectories stay short: at most a third of the turn budget
    assert max(len(actions) for _, actions, _ in results) <= env.max_turns // 3 + 2


def test_expert_solves_unseen_and_train_tasks():
    env = HouseholdEnv()
    for split in ("train", "unseen"):
        tasks = env.tasks(split, 50)
        assert sum(run_expert(env, t)[2] for t in tasks) >= 49


def test_expert_recovers_after_random_actions():
    env = HouseholdEnv()
    rng = random.Random(7)
    wins = 0
    for task in env.tasks("eval", 50):
        env.reset(task)
        for _ in range(8):
            env.step(rng.choice(env.admissible_actions()))
        while not env.done:
            assert env.step(env.expert_action()).info["valid"]
        wins += env.won
    assert wins >= 49


def test_random_admissible_policy_rarely_wins():
    env = HouseholdEnv()
    rng = random.Random(0)
    tasks = env.tasks("eval", 100)
    success = sum(run_random(env, t, rng) for t in tasks) / len(tasks)
    assert success <= 0.10


def test_same_seed_same_task():
    first_env, second_env = HouseholdEnv(), HouseholdEnv()
    for task in first_env.tasks("eval", 20):
        assert run_expert(first_env, task) == run_expert(second_env, task)
    # generation does not touch the global random state
    random.seed(123)
    before = random.random()
    random.seed(123)
    first_env.reset(Task("household", "train", 5))
    assert random.random() == before


def test_train_eval_disjoint_and_different():
    env = HouseholdEnv()
    train = env.tasks("train", 200)
    evals = env.tasks("eval", 200)
    assert not {t.seed for t in train} & {t.seed for t in evals}
    train_texts = {env.reset(t) for t in train}
    eval_texts = [env.reset(t) for t in evals]
    overlap = sum(text in train_texts for text in eval_texts)
    assert overlap <= 10  # rooms and goals are random: identical full texts are rare
    assert len(set(eval_texts)) >= 190


def test_unseen_split_uses_held_out_objects():
    env = HouseholdEnv()
    for split in ("train", "eval"):
        for task in env.tasks(split, 300):
            env.reset(task)
            assert not objects_in_room(env) & UNSEEN_ONLY_OBJECTS, task.task_id
            assert env.goal_kind in SEEN_OBJECTS
    for task in env.tasks("unseen", 100):
        first = env.reset(task)
        assert env.goal_kind in UNSEEN_ONLY_OBJECTS
        assert env.goal_kind in first.split("Your task is to:")[1]


def test_all_six_families_appear():
    env = HouseholdEnv()
    families = set()
    for task in env.tasks("eval", 100):
        env.reset(task)
        families.add(env.family)
    assert families == set(FAMILIES)


def test_rooms_are_modest_and_goals_sensible():
    env = HouseholdEnv()
    for task in env.tasks("train", 200):
        text = env.reset(task)
        assert 6 <= len(env.receptacles) <= 12
        assert 1 <= len(env.obj_kind) <= 15
        assert text.startswith("You are in the middle of a room. Looking quickly around you, you see ")
        assert "\n\nYour task is to: " in text
        assert env.family in OBJECTS[env.goal_kind].families
        if env.target_kind is not None:
            assert env.target_kind in OBJECTS[env.goal_kind].targets
            assert env.target_kind in RECEPTACLES
            # the goal is not already met at the start
            assert not env._goal_met()
        if env.appliance is not None:
            assert env.appliance in env.receptacles


def test_invalid_actions_do_not_raise():
    env = HouseholdEnv()
    env.reset(Task("household", "eval", 0))
    admissible_before = env.admissible_actions()
    junk = ["fly to moon", "", "   ", "x" * 100_000, "\u200b\u00ff\U0001F916 ??", "go to", "put",
            "take", "go to fridge 99", None, 42]
    for turn, action in enumerate(junk, start=1):
        result = env.step(action)
        assert result.info["valid"] is False
        assert result.observation == "Nothing happens."
        assert result.reward == 0.0 and not result.info["won"]
        assert result.info["feedback"]
        assert env.turns == turn  # invalid actions still count as steps
    assert env.admissible_actions() == admissible_before


def test_take_from_closed_receptacle_is_invalid():
    env = HouseholdEnv()
    for task in env.tasks("eval", 200):
        env.reset(task)
        closed_with_object = [r for r in env.receptacles
                              if r in env.is_open and any(o in env.obj_kind for o in env.contents[r])]
        if closed_with_object:
            break
    receptacle = closed_with_object[0]
    obj = next(o for o in env.contents[receptacle] if o in env.obj_kind)
    arrive = env.step(f"go to {receptacle}")
    assert arrive.info["valid"] and arrive.observation == f"You arrive at {receptacle}. The {receptacle} is closed."
    result = env.step(f"take {obj} from {receptacle}")
    assert result.info["valid"] is False and result.observation == "Nothing happens."
    assert "closed" in result.info["feedback"]
    opened = env.step(f"open {receptacle}")
    assert opened.info["valid"] and obj in opened.observation
    taken = env.step(f"Take {obj.upper()} from {receptacle}.")  # case and full stop are forgiven
    assert taken.info["valid"]
    assert taken.observation == f"You pick up the {obj} from the {receptacle}."
    assert env.step("inventory").observation == f"You are carrying: {'an' if obj[0] in 'aeiou' else 'a'} {obj}."


def test_put_accepts_in_and_on():
    env = HouseholdEnv()
    env.reset(Task("household", "eval", 3))
    # walk the expert until it holds something, then put it back where it stands in both wordings
    while env.holding is None:
        env.step(env.expert_action())
    held, here = env.holding, env.location
    for preposition in ("in", "on"):
        state = (env.holding, env.location)
        result = env.step(f"put {held} {preposition} {here}")
        assert result.info["valid"], result.info["feedback"]
        assert env.holding is None and held in env.contents[here]
        env.step(f"take {held} from {here}")
        assert (env.holding, env.location) == state


def test_episode_ends_at_max_turns():
    env = HouseholdEnv()
    env.reset(Task("household", "eval", 1))
    results = [env.step("look") for _ in range(env.max_turns)]
    assert all(not r.done for r in results[:-1])
    assert results[-1].done and results[-1].reward == 0.0 and results[-1].info["score"] == 0.0
    after = env.step("look")  # stepping a finished episode is harmless
    assert after.done and after.info["valid"] is False


def test_win_gives_reward_and_info():
    env = HouseholdEnv()
    env.reset(Task("household", "eval", 2))
    result = None
    while result is None or not result.done:
        result = env.step(env.expert_action())
    assert result.reward == 1.0 and result.info["won"] and result.info["score"] == 1.0
    assert set(result.info) == {"valid", "won", "score", "admissible", "feedback"}


def test_admissible_actions_are_valid_sorted_and_focused():
    env = HouseholdEnv()
    rng = random.Random(3)
    for task in env.tasks("train", 20):
        env.reset(task)
        for _ in range(15):
            actions = env.admissible_actions()
            assert actions == sorted(actions) and len(actions) == len(set(actions))
            assert len(actions) <= len(env.receptacles) + 25
            assert "look" in actions and "inventory" in actions
            result = env.step(rng.choice(actions))
            assert result.info["valid"]
            assert result.info["admissible"] == env.admissible_actions()
            if result.done:
                break


def test_processing_changes_object_state():
    env = HouseholdEnv()
    for task in env.tasks("eval", 100):
        env.reset(task)
        if env.family == "pick_heat_then_place":
            break
    while env.holding is None or env.location != env.appliance:
        env.step(env.expert_action())
    held = env.holding
    result = env.step(f"heat {held} with microwave 1")
    assert result.observation == f"You heat the {held} using the microwave 1."
    assert "hot" in env.obj_states[held]
    assert env.step(f"cool {held} with microwave 1").info["valid"] is False


def test_unknown_split_is_a_user_error():
    with pytest.raises(UserError):
        HouseholdEnv().reset(Task("household", "test", 0))
