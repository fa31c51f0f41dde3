"""Tests for the WebShop-style `shop` environment (atod_edge/envs/shop.py)."""

from __future__ import annotations

import random

import pytest

from atod_edge.envs import make_env
from atod_edge.envs.base import Task
from atod_edge.envs.shop import SEEN_CATEGORIES, UNSEEN_CATEGORIES, ShopEnv, catalog, make_goal, match_score, satisfies


def run_expert(env: ShopEnv, task: Task) -> tuple[list[str], list[str], dict]:
    observations, actions = [env.reset(task)], []
    while True:
        action = env.expert_action()
        assert action in env.admissible_actions() or action.startswith("search[")
        result = env.step(action)
        actions.append(action)
        observations.append(result.observation)
        if result.done:
            return actions, observations, result.info


def test_registry_builds_shop():
    env = make_env("shop")
    assert isinstance(env, ShopEnv) and env.name == "shop" and env.max_turns == 15


def test_catalog_is_deterministic_and_a_few_hundred_products():
    from atod_edge.envs.shop import generate_catalog

    products = catalog().products
    assert 200 <= len(products) <= 600
    assert generate_catalog() == products  # same seed -> same products and ids
    assert len({p.title for p in products}) == len(products)


def test_expert_succeeds_on_eval_tasks():
    env = ShopEnv()
    tasks = env.tasks("eval", 100)
    wins = 0
    for task in tasks:
        actions, _, info = run_expert(env, task)
        wins += info["won"]
        assert actions[-1] == "click[buy]" and len(actions) <= env.max_turns
    assert wins / len(tasks) >= 0.99


def test_expert_succeeds_on_unseen_tasks():
    env = ShopEnv()
    wins = sum(run_expert(env, task)[2]["won"] for task in env.tasks("unseen", 50))
    assert wins >= 49


def random_action(env: ShopEnv, rng: random.Random) -> str:
    action = rng.choice(env.admissible_actions())
    if action == "search[<query>]":
        words = rng.sample(catalog().vocabulary, rng.randint(1, 4))
        action = f"search[{' '.join(words)}]"
    return action


def test_random_policy_rarely_succeeds():
    env, rng = ShopEnv(), random.Random(0)
    wins = 0
    tasks = env.tasks("eval", 100)
    for task in tasks:
        env.reset(task)
        while True:
            result = env.step(random_action(env, rng))
            assert result.info["valid"], result.observation  # admissible actions are valid
            if result.done:
                wins += result.info["won"]
                break
    assert wins / len(tasks) <= 0.10


def test_same_seed_same_task_and_trajectory():
    task = Task("shop", "train", 7)
    first, second = ShopEnv(), ShopEnv()
    assert first.reset(task) == second.reset(task)
    assert run_expert(first, task) == run_expert(second, task)
    assert make_goal(task) == make_goal(Task("shop", "train", 7))


def test_train_and_eval_are_disjoint_and_same_distribution():
    env = ShopEnv()
    train, evaluation = env.tasks("train", 300), env.tasks("eval", 300)
    assert not {t.seed for t in train} & {t.seed for t in evaluation}
    train_goals = [make_goal(t) for t in train]
    eval_goals = [make_goal(t) for t in evaluation]
    # different seeds give mostly different instructions, from the same seen categories
    assert len({g.instruction for g in eval_goals} - {g.instruction for g in train_goals}) > 200
    assert {g.category for g in train_goals} == {g.category for g in eval_goals} == set(SEEN_CATEGORIES)


def test_unseen_split_asks_only_for_held_out_categories():
    env = ShopEnv()
    unseen = {make_goal(t).category for t in env.tasks("unseen", 200)}
    assert unseen == set(UNSEEN_CATEGORIES)
    assert not unseen & set(SEEN_CATEGORIES)


def test_instruction_names_category_attributes_options_and_price():
    goal = make_goal(Task("shop", "eval", 3))
    text = goal.instruction
    assert goal.category in text and all(a in text for a in goal.attributes)
    assert all(v in text for v in goal.options.values()) and f"{goal.price_limit:.2f}" in text
    assert satisfies(catalog().by_id[goal.target_id], goal)


def test_match_score_is_webshop_style():
    goal = make_goal(Task("shop", "eval", 11))
    target = catalog().by_id[goal.target_id]
    assert match_score(target, dict(goal.options), goal) == 1.0
    # no options chosen: only attributes and price count
    expected = (len(goal.attributes) + 1) / (len(goal.attributes) + len(goal.options) + 1)
    assert match_score(target, {}, goal) == pytest.approx(expected)
    other = next(p for p in catalog().products if p.category != goal.category)
    assert match_score(other, dict(goal.options), goal) <= 0.1


def test_buying_without_options_gives_partial_reward():
    env = ShopEnv()
    task = next(t for t in env.tasks("eval", 50) if make_goal(t).options)
    env.reset(task)
    goal = env.goal
    env.step(f"search[{catalog().by_id[goal.target_id].title}]")
    result = env.step(f"click[{goal.target_id}]")
    assert result.info["valid"] and "features:" in result.observation
    result = env.step("click[buy]")
    assert result.done and not result.info["won"] and 0 < result.reward < 1


def test_click_by_title_and_paging():
    env = ShopEnv()
    env.reset(Task("shop", "eval", 0))
    result = env.step("search[waterproof]")
    assert "page 1/" in result.observation and "click[next]" in result.info["admissible"]
    result = env.step("click[next]")
    assert "page 2/" in result.observation
    assert env.step("click[prev]").info["valid"]
    first_id = env.state.results[0]
    title = catalog().by_id[first_id].title
    result = env.step(f"click[{title.upper()}]")
    assert result.info["valid"] and result.observation.startswith(first_id)
    assert env.step("click[back]").info["valid"] and env.state.kind == "results"
    assert env.step("click[back]").info["valid"] and env.state.kind == "search"


JUNK_ACTIONS = ["", "   ", "buy", "click[]", "search[]", "search[ ,.; ]", "jump[p001]", "click[p999]",
                "click[next]", "click[buy]", "☃ click[☃] ☃", "\x00\n\t", "click[" * 1000,
                "click[" + "p001" * 50_000 + "]", None]


@pytest.mark.parametrize("junk", JUNK_ACTIONS, ids=range(len(JUNK_ACTIONS)))
def test_invalid_actions_are_safe_steps(junk):
    env = ShopEnv()
    env.reset(Task("shop", "eval", 1))
    result = env.step(junk)
    assert not result.info["valid"] and not result.done and result.reward == 0.0
    assert result.info["feedback"] and len(result.observation) < 400
    assert env.turn == 1
    assert set(result.info) >= {"valid", "won", "score", "admissible", "feedback"}


def test_huge_unicode_search_is_valid_but_short():
    env = ShopEnv()
    env.reset(Task("shop", "eval", 1))
    result = env.step("search[" + "jäcket wáterproof 🙂 " * 20_000 + "]")
    assert result.info["valid"] and len(result.observation) < 400
    result = env.step("search[" + "x" * 200_000 + "]")  # one unknown word: valid, no results
    assert result.info["valid"] and "no results" in result.observation and len(result.observation) < 400


def test_episode_ends_at_max_turns_with_zero_reward():
    env = ShopEnv()
    env.reset(Task("shop", "eval", 2))
    for turn in range(1, env.max_turns + 1):
        result = env.step("search[organic tea]")
        assert result.done == (turn == env.max_turns)
    assert result.reward == 0.0 and not result.info["won"] and "out of turns" in result.observation
    after = env.step("click[buy]")
    assert after.done and not after.info["valid"]
