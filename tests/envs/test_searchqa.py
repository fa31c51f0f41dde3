"""Tests for the Search-R1-style `searchqa` environment (atod_edge/envs/searchqa.py)."""

from __future__ import annotations

import random

import pytest

from atod_edge.envs import make_env
from atod_edge.envs.base import Task
from atod_edge.envs.searchqa import ACTION_TEMPLATES, SEEN_QUESTIONS, UNSEEN_QUESTIONS, UNSEEN_RELATIONS, SearchQAEnv, World, make_question, normalise_answer, world


def run_expert(env: SearchQAEnv, task: Task) -> tuple[list[str], list[str], dict]:
    observations, actions = [env.reset(task)], []
    while True:
        action = env.expert_action()
        result = env.step(action)
        actions.append(action)
        observations.append(result.observation)
        assert result.info["valid"]
        if result.done:
            return actions, observations, result.info


def test_registry_builds_searchqa():
    env = make_env("searchqa")
    assert isinstance(env, SearchQAEnv) and env.name == "searchqa" and env.max_turns == 4


def test_world_is_deterministic_with_one_passage_per_entity():
    first, second = world(), World()
    assert first.passages == second.passages and first.facts == second.facts
    assert len(first.passages) == len(first.names) == len(set(first.names)) >= 150
    assert all(passage.startswith(name) for name, passage in zip(first.names, first.passages))


def test_expert_succeeds_on_eval_tasks_and_its_searches_reveal_each_hop():
    env = SearchQAEnv()
    tasks = env.tasks("eval", 100)
    wins = 0
    for task in tasks:
        actions, observations, info = run_expert(env, task)
        wins += info["won"]
        question = env.question
        assert len(actions) == len(question.relations) + 1 <= env.max_turns
        # the answer is readable from what the searches returned, not only known to the expert
        search_text = "\n".join(observations[1:-1])
        assert all(entity in search_text for entity in question.hops[1:])
    assert wins / len(tasks) >= 0.99


def test_expert_succeeds_on_unseen_tasks():
    env = SearchQAEnv()
    assert sum(run_expert(env, task)[2]["won"] for task in env.tasks("unseen", 50)) >= 49


def test_random_policy_rarely_succeeds():
    env, rng = SearchQAEnv(), random.Random(0)
    vocabulary = world().vocabulary
    wins = 0
    tasks = env.tasks("eval", 100)
    for task in tasks:
        env.reset(task)
        while True:
            template = rng.choice(env.admissible_actions())
            words = " ".join(rng.sample(vocabulary, rng.randint(1, 3)))
            result = env.step(template.replace("<query>", words).replace("<text>", words))
            assert result.info["valid"]
            if result.done:
                wins += result.info["won"]
                break
    assert wins / len(tasks) <= 0.10


def test_admissible_actions_are_the_templates():
    env = SearchQAEnv()
    env.reset(Task("searchqa", "eval", 0))
    assert env.admissible_actions() == ACTION_TEMPLATES == ["search[<query>]", "answer[<text>]"]


def test_same_seed_same_question_and_trajectory():
    task = Task("searchqa", "train", 5)
    first, second = SearchQAEnv(), SearchQAEnv()
    assert first.reset(task) == second.reset(task)
    assert run_expert(first, task) == run_expert(second, task)
    assert make_question(task) == make_question(Task("searchqa", "train", 5))


def test_train_and_eval_are_disjoint_and_same_distribution():
    env = SearchQAEnv()
    train, evaluation = env.tasks("train", 300), env.tasks("eval", 300)
    assert not {t.seed for t in train} & {t.seed for t in evaluation}
    train_questions = [make_question(t) for t in train]
    eval_questions = [make_question(t) for t in evaluation]
    # a different random stream, not a copy of train (the finite world makes some texts recur)
    assert sum(t.text != e.text for t, e in zip(train_questions, eval_questions)) > 250
    assert len({q.text for q in eval_questions}) > 200
    assert {q.relations for q in train_questions} == {q.relations for q in eval_questions} == set(SEEN_QUESTIONS)
    assert {len(q.relations) for q in eval_questions} == {1, 2}


def test_unseen_split_uses_held_out_relations_and_entity_kind():
    env = SearchQAEnv()
    unseen = [make_question(t) for t in env.tasks("unseen", 200)]
    assert {q.relations for q in unseen} == set(UNSEEN_QUESTIONS)
    assert all(set(q.relations) & set(UNSEEN_RELATIONS) for q in unseen)
    seen = [make_question(t) for t in env.tasks("eval", 200)]
    assert not any(set(q.relations) & set(UNSEEN_RELATIONS) for q in seen)
    # universities are never on a train/eval question's path
    assert all(world().kind[name] != "university" for q in seen for name in q.hops)
    assert any(world().kind[name] == "university" for q in unseen for name in q.hops)


@pytest.mark.parametrize("given", ["Krematol", "the krematol.", "  KREMATOL!! ", "a  krematol"])
def test_answers_match_after_normalisation(given):
    assert normalise_answer(given) == normalise_answer("krematol") == "krematol"


def test_answer_rewards_exact_match_only():
    env = SearchQAEnv()
    env.reset(Task("searchqa", "eval", 3))
    answer = env.question.answer
    result = env.step(f"answer[The {answer.upper()}.]")
    assert result.done and result.reward == 1.0 and result.info["won"] and result.info["score"] == 1.0
    env.reset(Task("searchqa", "eval", 3))
    result = env.step(f"answer[{answer} city]")
    assert result.done and result.reward == 0.0 and not result.info["won"]


def test_search_shows_top_three_passages_entity_first():
    env = SearchQAEnv()
    env.reset(Task("searchqa", "eval", 0))
    subject = env.question.subject
    result = env.step(f"search[{subject.upper()}]")
    lines = result.observation.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"1. {subject}")


JUNK_ACTIONS = ["", "   ", "answer", "search[]", "answer[]", "answer[ the ]", "search[ ,.; ]", "look[x]",
                "☃ answer[☃] ☃", "\x00\n\t", "search[" * 1000, None]


@pytest.mark.parametrize("junk", JUNK_ACTIONS, ids=range(len(JUNK_ACTIONS)))
def test_invalid_actions_are_safe_steps(junk):
    env = SearchQAEnv()
    env.reset(Task("searchqa", "eval", 1))
    result = env.step(junk)
    assert not result.info["valid"] and not result.done and result.reward == 0.0
    assert result.info["feedback"] and len(result.observation) < 300 and env.turn == 1
    assert set(result.info) >= {"valid", "won", "score", "admissible", "feedback"}


def test_huge_unicode_search_is_valid_but_short():
    env = SearchQAEnv()
    env.reset(Task("searchqa", "eval", 1))
    for query in ["ünïcödé 🙂 born " * 20_000, "x" * 200_000]:
        result = env.step(f"search[{query}]")
        assert result.info["valid"] and not result.done and len(result.observation) < 600


def test_episode_ends_at_max_turns_with_zero_reward():
    env = SearchQAEnv()
    env.reset(Task("searchqa", "eval", 2))
    for turn in range(1, env.max_turns + 1):
        result = env.step("search[capital]")
        assert result.done == (turn == env.max_turns)
    assert result.reward == 0.0 and not result.info["won"] and "out of turns" in result.observation
    after = env.step(f"answer[{env.question.answer}]")
    assert after.done and not after.info["valid"] and after.reward == 0.0
