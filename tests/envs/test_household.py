"""Tests for the built-in ALFWorld-style household environment (atod_edge/envs/household/)."""

from __future__ import annotations

import random

import pytest

from atod_edge.envs import Task, make_env
from atod_edge.envs.base import HISTORY_TURNS as RECENT_TURNS
from atod_edge.envs.household.catalog import FAMILIES, OBJECTS, RECEPTACLES, SEEN_OBJECTS, UNSEEN_ONLY_OBJECTS
from atod_edge.envs.household.env import HouseholdEnv
from atod_edge.envs.household.experts import parse_goal, visible_expert_action
from atod_edge.errors import UserError


def run_expert(env: HouseholdEnv, task: Task, oracle: bool = False) -> tuple[str, list[str], bool]:
    """Play one episode with the expert; return the reset text, the actions and whether it won."""
    first = env.reset(task)
    actions = []
    while not env.done:
        action = env.expert_action(oracle=oracle)
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
    # the search without an oracle costs turns, but leaves a third of the budget spare
    lengths = [len(actions) for _, actions, _ in results]
    assert max(lengths) <= env.max_turns * 2 // 3
    assert sum(lengths) / len(lengths) <= 9


def test_oracle_is_kept_and_shorter():
    env = HouseholdEnv()
    tasks = env.tasks("eval", 100)
    oracle = [run_expert(env, t, oracle=True) for t in tasks]
    visible = [run_expert(env, t) for t in tasks]
    assert all(won for _, _, won in oracle)
    assert sum(len(a) for _, a, _ in oracle) < sum(len(a) for _, a, _ in visible)
    env.reset(tasks[0])
    assert env.oracle_action() == env.expert_action(oracle=True)


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


# ---------------------------------------------------------------- the expert sees what the agent sees

def test_parse_goal_reads_every_task_text():
    env = HouseholdEnv()
    for split in ("train", "unseen"):
        for task in env.tasks(split, 300):
            goal = parse_goal(env.reset(task))
            assert goal.family == env.family and goal.obj == env.goal_kind
            assert goal.target == env.target_kind and goal.lamp == env.goal_lamp
    with pytest.raises(ValueError):
        parse_goal("Your task is to: fly to the moon.")


def test_expert_is_a_function_of_the_prompt_view():
    """Replay each expert episode from what the rollout records (the first observation, the
    (action, observation) turns, the admissible actions): the action needs nothing hidden."""
    env = HouseholdEnv()
    for task in env.tasks("train", 150):
        first = env.reset(task)
        history: list[tuple[str, str]] = []
        admissible = env.admissible_actions()
        while not env.done:
            action = env.expert_action()
            assert visible_expert_action(first, history[-RECENT_TURNS:], admissible) == action
            result = env.step(action)
            history.append((action, result.observation))
            admissible = result.info["admissible"]
        assert env.won, task.task_id


def _move_goal_objects(env: HouseholdEnv, receptacle: str) -> None:
    """Hide every goal object in `receptacle` (test surgery on the hidden world state)."""
    for obj, kind in env.obj_kind.items():
        if kind == env.goal_kind:
            env.contents[env.obj_loc[obj]].remove(obj)
            env.contents[receptacle].append(obj)
            env.obj_loc[obj] = receptacle
    env._refresh_actions()


def _candidates(env: HouseholdEnv) -> list[str]:
    kinds = set(OBJECTS[env.goal_kind].starts) - {env.target_kind}
    return sorted(r for r in env.receptacles if env.rec_kind[r] in kinds)


def test_expert_searches_candidates_in_sorted_order():
    """With the goal object hidden in the last candidate, the expert visits every candidate in
    sorted order, opening the closed ones, and takes the object only there."""
    env = HouseholdEnv()
    checked = 0
    for task in env.tasks("eval", 300):
        env.reset(task)
        candidates = _candidates(env)
        if env.family != "pick_and_place" or len(candidates) < 3:
            continue
        _move_goal_objects(env, candidates[-1])
        visits, actions = [], []
        while env.holding is None:
            action = env.expert_action()
            actions.append(action)
            if action.startswith("go to "):
                visits.append(action[len("go to "):])
            elif action.startswith("open "):
                assert action == f"open {visits[-1]}"  # only on arrival
            assert env.step(action).info["valid"]
        assert visits == candidates
        assert actions[-1].startswith(f"take {env.goal_kind} ") and actions[-1].endswith(f"from {candidates[-1]}")
        while not env.done:
            env.step(env.expert_action())
        assert env.won
        checked += 1
    assert checked >= 10


def test_expert_action_ignores_hidden_placement():
    """Same task text and same visible turns, different hidden rooms: same actions until the
    object comes into view; the oracle, by contrast, heads straight for it."""
    env_near, env_far = HouseholdEnv(), HouseholdEnv()
    checked = 0
    for task in env_near.tasks("eval", 300):
        env_near.reset(task)
        env_far.reset(task)
        candidates = _candidates(env_near)
        if len(candidates) < 3:
            continue
        _move_goal_objects(env_near, candidates[1])
        _move_goal_objects(env_far, candidates[-1])
        assert env_near.oracle_action() != env_far.oracle_action()
        # identical views until the near room shows the object at candidates[1]
        while True:
            action = env_near.expert_action()
            assert env_far.expert_action() == action
            near, far = env_near.step(action), env_far.step(action)
            if env_near.location == candidates[1] and env_near._visible_inside(candidates[1]):
                break
            assert near.observation == far.observation and near.info["admissible"] == far.info["admissible"]
        assert env_near.expert_action().startswith("take ")
        assert env_far.expert_action().startswith("go to ")
        checked += 1
    assert checked >= 20


def test_expert_takes_back_an_unprocessed_object_put_in_the_target():
    """The object's state is not shown: after a put that did not win, the expert takes the
    object back and processes it (visible from the last turns) instead of looping."""
    env = HouseholdEnv()
    for task in env.tasks("eval", 200):
        env.reset(task)
        if env.family == "pick_heat_then_place":
            break
    while env.holding is None:
        env.step(env.expert_action())
    held = env.holding
    target = sorted(r for r in env.receptacles if env.rec_kind[r] == env.target_kind)[0]
    env.step(f"go to {target}")  # skip the microwave
    if env.expert_action().startswith("open "):
        env.step(env.expert_action())
    assert env.expert_action().startswith(f"put {held} ")  # it trusts an arrival at the target
    assert not env.step(env.expert_action()).done
    assert env.expert_action() == f"take {held} from {target}"
    env.step(env.expert_action())
    assert env.expert_action() == "go to microwave 1"
    while not env.done:
        env.step(env.expert_action())
    assert env.won


def test_noisy_expert_mostly_wins():
    """Imperfect demonstrations (a random admissible action 20% of the time) still mostly win,
    also when another policy carries the goal object somewhere it never starts."""
    env = HouseholdEnv()
    wins = 0
    for i, task in enumerate(env.tasks("train", 100)):
        rng = random.Random(i)
        env.reset(task)
        while not env.done:
            noisy = rng.random() < 0.2
            env.step(rng.choice(env.admissible_actions()) if noisy else env.expert_action())
        wins += env.won
    assert wins >= 95


def test_the_expert_reads_the_turns_the_default_prompt_shows():
    """The visible expert reads the last HISTORY_TURNS turns (envs/base.py); its demonstrations
    are imitable only if the prompt shows as many. Every default of `history_turns` is that
    one constant, so changing it changes both sides together."""
    import dataclasses
    import inspect

    from atod_edge.evaluate.evaluate import EvalConfig
    from atod_edge.prompts import build_messages
    from atod_edge.rollout.agent import Agent
    from atod_edge.rollout.runner import act, episode_messages, run_episodes
    from atod_edge.train.config import SFTConfig, TrainConfig

    functions = [build_messages, episode_messages, run_episodes, act, Agent.__init__, Agent.load]
    defaults = {f.__qualname__: inspect.signature(f).parameters["history_turns"].default for f in functions}
    for cls in (EvalConfig, TrainConfig, SFTConfig):
        defaults[cls.__name__] = next(f.default for f in dataclasses.fields(cls) if f.name == "history_turns")
    assert defaults == {name: RECENT_TURNS for name in defaults}
