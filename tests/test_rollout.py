"""Tests for atod_edge/rollout.py: the batched rollout engine, scripted policies, episode prompts."""

from __future__ import annotations

import random
import re

import pytest
import torch

from atod_edge.envs import Env, StepResult, Task, make_env
from atod_edge.envs.household.env import HouseholdEnv
from atod_edge.engine.policy import Generation, Policy
from atod_edge.engine.sampling import SamplingParams
from atod_edge.prompts import build_messages, encode_prompt, parse_action
from atod_edge.rollout.runner import EnvPool, act, episode_messages, run_episodes, run_scripted
from atod_edge.scoring.logprobs import response_logprobs

SHORT = SamplingParams(max_new_tokens=6, temperature=1.0)


class CountdownEnv(Env):
    """A tiny env: task i ends after i + 1 steps whatever the actions ("wait" is the valid one).
    Task 98 raises in reset, task 99 raises in step."""

    name = "countdown"
    max_turns = 10
    description = "wait until it is over"
    instructions = "Reply wait."

    def reset(self, task: Task) -> str:
        if task.index == 98:
            raise RuntimeError("reset exploded")
        self.task, self.steps = task, 0
        return f"Task {task.index}: wait {task.index + 1} times."

    def step(self, action: str) -> StepResult:
        if self.task.index == 99:
            raise RuntimeError("step exploded")
        self.steps += 1
        done = self.steps >= self.task.index + 1
        valid = action == "wait"
        observation = f"You waited {self.steps} times." if valid else "Nothing happens."
        return StepResult(observation, 1.0 if done else 0.0, done,
                          {"valid": valid, "won": done, "score": 1.0 if done else 0.0,
                           "admissible": [] if done else ["wait"],
                           "feedback": "" if valid else "say wait"})

    def admissible_actions(self) -> list[str]:
        return ["wait"]

    def expert_action(self) -> str:
        return "wait"


class RecordingPolicy(Policy):
    """Wraps a real policy and records the prompts of every batched call."""

    def __init__(self, inner: Policy):
        self.inner, self.name, self.tokenizer = inner, inner.name, inner.tokenizer
        self.calls: list[list[list[int]]] = []

    def generate(self, prompts, sampling, seed=None):
        self.calls.append([list(p) for p in prompts])
        return self.inner.generate(prompts, sampling, seed=seed)


class AdmissiblePolicy(Policy):
    """A model-free policy over the real tokenizer: reads the admissible actions listed in the
    decoded prompt and answers one of them (seeded), so episodes take valid, varied steps."""

    name = "admissible"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompts, sampling, seed=None):
        rng = random.Random(seed)
        out = []
        for prompt in prompts:
            text = self.tokenizer.decode(prompt, skip_special_tokens=True)
            listed = re.findall(r"Admissible actions: (.*)", text)[-1].split(" | ")
            response = f"<action>{rng.choice(listed)}</action>"
            ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            out.append(Generation(ids, [0.0] * len(ids), response, "stop"))
        return out


def countdown_tasks(*indices: int) -> list[Task]:
    return [Task("countdown", "eval", i) for i in indices]


def test_groups_record_tokens_and_leave_the_batch_as_they_finish(student_policy):
    policy = RecordingPolicy(student_policy)
    episodes = run_episodes(policy, CountdownEnv, countdown_tasks(0, 1, 2), group_size=2,
                            sampling=SHORT, seed=5, step=7)
    # task i lasts i + 1 turns: 6 episodes, then 4, then 2 in the batch
    assert [len(call) for call in policy.calls] == [6, 4, 2]
    assert [ep.group for ep in episodes] == [0, 0, 1, 1, 2, 2]
    assert [ep.num_turns for ep in episodes] == [1, 1, 2, 2, 3, 3]
    assert [ep.task_id for ep in episodes] == ["countdown/eval/0"] * 2 + ["countdown/eval/1"] * 2 + \
        ["countdown/eval/2"] * 2
    tokenizer = student_policy.tokenizer
    for ep in episodes:
        assert ep.success and ep.score == 1.0 and ep.step == 7 and ep.policy == "tiny-student"
        assert ep.turns[0].observation == CountdownEnv().reset(Task("countdown", "eval", ep.group))
        assert [t.done for t in ep.turns] == [False] * (ep.num_turns - 1) + [True]
        for turn in ep.turns:
            assert turn.prompt_ids and 0 < len(turn.response_ids) <= SHORT.max_new_tokens
            assert len(turn.student_logprobs) == len(turn.response_ids)
            assert all(lp <= 0 for lp in turn.student_logprobs)
            assert turn.response == tokenizer.decode(turn.response_ids, skip_special_tokens=True)
            assert turn.action == parse_action(turn.response).action
            if not turn.valid:
                assert turn.feedback
    # the two rollouts of a group share the reset; different samples (almost surely) differ
    assert episodes[4].turns[0].prompt_ids == episodes[5].turns[0].prompt_ids
    assert episodes[4].turns[0].response_ids != episodes[5].turns[0].response_ids
    # the first turn's batched prompts are exactly the recorded ones, in episode order
    assert policy.calls[0] == [ep.turns[0].prompt_ids for ep in episodes]


def test_recorded_logprobs_match_scoring_the_recorded_tokens(tiny_student, student_policy):
    model, tokenizer = tiny_student
    episodes = run_episodes(student_policy, CountdownEnv, countdown_tasks(1, 0), sampling=SHORT, seed=1)
    turns = [t for ep in episodes for t in ep.turns]
    with torch.inference_mode():
        scored = response_logprobs(model, [t.prompt_ids for t in turns], [t.response_ids for t in turns],
                                   pad_id=tokenizer.pad_token_id)
    for turn, lp in zip(turns, scored):
        assert lp == pytest.approx(torch.tensor(turn.student_logprobs), abs=1e-4)


@pytest.mark.parametrize("env_name", ["household", "shop", "searchqa"])
def test_garbage_from_the_model_never_crashes_an_episode(student_policy, env_name):
    env = make_env(env_name)
    episodes = run_episodes(student_policy, env_name, env.tasks("eval", 2), sampling=SHORT, max_turns=2)
    for ep in episodes:
        assert "error" not in ep.meta and 1 <= ep.num_turns <= 2
        assert ep.turns[-1].done
        for turn in ep.turns:
            assert turn.valid or turn.feedback


def test_a_parsed_but_inadmissible_action_gets_the_envs_feedback(tiny_student, student_policy, forced_text):
    model, tokenizer = tiny_student
    forced = tokenizer("<action>dance with the fridge</action>", add_special_tokens=False)["input_ids"]
    with forced_text(model, forced):
        [ep] = run_episodes(student_policy, "household", HouseholdEnv().tasks("eval", 1),
                            sampling=SamplingParams(max_new_tokens=24), max_turns=2)
    assert ep.num_turns == 2 and "error" not in ep.meta
    for turn in ep.turns:
        assert turn.action == "dance with the fridge" and not turn.valid and turn.feedback
        assert turn.response_ids == forced
    assert ep.turns[1].observation            # the env answered the bad action in words


def test_an_env_that_raises_ends_only_its_own_episode(student_policy):
    episodes = run_episodes(student_policy, CountdownEnv, countdown_tasks(0, 98, 99, 1), sampling=SHORT)
    ok_first, broken_reset, broken_step, ok_last = episodes
    assert "reset exploded" in broken_reset.meta["error"] and broken_reset.num_turns == 0
    assert "step exploded" in broken_step.meta["error"] and broken_step.num_turns == 1
    assert not broken_reset.success and not broken_step.success
    for ep in (ok_first, ok_last):
        assert "error" not in ep.meta and ep.success
    assert ok_last.num_turns == 2


@pytest.mark.parametrize("history_turns", [0, 1, 2])
def test_episode_messages_rebuild_the_engines_prompts(student_policy, history_turns):
    # SFT trains on episode_messages(...) of demonstrations; the engine must have used the same.
    policy = AdmissiblePolicy(student_policy.tokenizer)
    tasks = HouseholdEnv().tasks("eval", 2)
    episodes = run_episodes(policy, "household", tasks, seed=history_turns, history_turns=history_turns,
                            max_turns=5)
    assert all(t.valid for ep in episodes for t in ep.turns)
    for ep in episodes:
        assert ep.num_turns >= 3
        for k, turn in enumerate(ep.turns):
            messages = episode_messages(ep, k, HouseholdEnv.instructions, history_turns)
            assert encode_prompt(policy.tokenizer, messages) == turn.prompt_ids


def test_episode_messages_of_a_model_rollout_with_invalid_turns(student_policy):
    episodes = run_episodes(student_policy, CountdownEnv, countdown_tasks(2), sampling=SHORT)
    for ep in episodes:
        for k, turn in enumerate(ep.turns):
            messages = episode_messages(ep, k, CountdownEnv.instructions)
            assert encode_prompt(student_policy.tokenizer, messages) == turn.prompt_ids


@pytest.mark.parametrize("env_name", ["household", "shop", "searchqa"])
def test_run_scripted_expert_wins(env_name):
    env = make_env(env_name)
    episodes = run_scripted("expert", env_name, env.tasks("eval", 3))
    assert all(ep.success for ep in episodes)
    assert all(t.valid and parse_action(t.response).action == t.action for ep in episodes for t in ep.turns)
    assert [ep.group for ep in episodes] == [0, 1, 2] and episodes[0].policy == "expert"


def test_noisy_expert_differs_and_is_seeded():
    tasks = HouseholdEnv().tasks("eval", 4)
    actions = lambda eps: [[t.action for t in ep.turns] for ep in eps]  # noqa: E731
    expert = actions(run_scripted("expert", "household", tasks))
    assert actions(run_scripted("noisy", "household", tasks, noise=0.0)) == expert
    noisy = actions(run_scripted("noisy", "household", tasks, noise=0.5, seed=1))
    assert noisy != expert
    assert actions(run_scripted("noisy", "household", tasks, noise=0.5, seed=1)) == noisy
    random_eps = run_scripted("random", "household", tasks, max_turns=5)
    assert all(ep.num_turns <= 5 for ep in random_eps)
    with pytest.raises(ValueError, match="unknown scripted policy"):
        run_scripted("clever", "household", tasks)


def test_dart_demos_label_every_state_with_the_expert_action():
    """dart: noisy (sometimes stale, invalid) execution, and each turn's expert_action is what
    the expert does in exactly that state; noise 0 is the expert."""
    tasks = HouseholdEnv().tasks("train", 6)
    expert = run_scripted("expert", "household", tasks)
    assert ([[t.action for t in ep.turns] for ep in run_scripted("dart", "household", tasks, noise=0.0)]
            == [[t.action for t in ep.turns] for ep in expert])
    dart = run_scripted("dart", "household", tasks, noise=0.4, seed=3)
    turns = [t for ep in dart for t in ep.turns]
    assert all(t.expert_action for t in turns)
    assert any(t.action != t.expert_action for t in turns)          # noise was executed
    assert any(not t.valid for t in turns)                           # stale actions can be invalid
    for ep in dart[:3]:   # replay: the label is the expert's action in the replayed state
        env = HouseholdEnv()
        env.reset(_task_of(ep))
        for t in ep.turns:
            assert env.expert_action() == t.expert_action
            env.step(t.action)


def _task_of(episode):
    return next(t for t in HouseholdEnv().tasks(episode.split, 6) if t.task_id == episode.task_id)


def test_act_builds_the_engines_prompt_and_parses(tiny_student, student_policy, forced_text):
    model, tokenizer = tiny_student
    policy = RecordingPolicy(student_policy)
    forced = tokenizer("ok <action>look</action>", add_special_tokens=False)["input_ids"]
    history = [("look", "You see a desk 1.")]
    with forced_text(model, forced):
        text, action, reason = act(policy, "Reply.", "TASK", history, "You see a desk 1.", ["look"])
    assert (text, action, reason) == ("ok <action>look</action>", "look", "")
    expected = build_messages("Reply.", "TASK", history, "You see a desk 1.", ["look"])
    assert policy.calls == [[encode_prompt(tokenizer, expected)]]


# --- env lifetime: close() and reusable instances ---------------------------------------------


class HandleEnv(CountdownEnv):
    """A plug-in that holds an OS resource per instance (a file handle, standing in for an engine
    process) and counts the handles it has open; close() releases its own."""

    opened: list = []          # every handle ever opened (class-wide)
    reusable = False

    def __init__(self):
        self.handle = open(__file__, "rb")
        HandleEnv.opened.append(self.handle)

    def close(self):
        self.handle.close()

    @classmethod
    def still_open(cls) -> int:
        return sum(not h.closed for h in cls.opened)


class ReusableHandleEnv(HandleEnv):
    reusable = True


@pytest.fixture
def handles():
    HandleEnv.opened = []
    yield HandleEnv
    for handle in HandleEnv.opened:
        handle.close()


def test_every_env_is_closed_when_its_episode_ends_also_after_an_error(student_policy, handles):
    policy = AdmissiblePolicy(student_policy.tokenizer)
    episodes = run_episodes(policy, HandleEnv, countdown_tasks(0, 99, 2), group_size=2, env_pool=EnvPool())
    assert "step exploded" in episodes[2].meta["error"]
    assert len(handles.opened) == 6 and handles.still_open() == 0
    run_scripted("expert", HandleEnv, countdown_tasks(1, 98, 3), env_pool=EnvPool())   # 98: reset raises
    assert len(handles.opened) == 9 and handles.still_open() == 0


def test_a_reusable_env_serves_later_episodes_and_steps(student_policy, handles):
    policy = AdmissiblePolicy(student_policy.tokenizer)
    pool = EnvPool()
    for step in range(3):        # three "training steps" of B=2 tasks x G=2
        episodes = run_episodes(policy, ReusableHandleEnv, countdown_tasks(step, step + 1), group_size=2,
                                env_pool=pool)
        assert all(ep.success for ep in episodes)
    assert len(handles.opened) == 4 and handles.still_open() == 4 and pool.idle() == 4
    # an env whose episode broke is closed, not handed out again
    run_episodes(policy, ReusableHandleEnv, countdown_tasks(99), group_size=2, env_pool=pool)
    assert len(handles.opened) == 4 and handles.still_open() == 2 and pool.idle() == 2
    run_scripted("expert", ReusableHandleEnv, countdown_tasks(0, 1, 2, 3), env_pool=pool)
    assert len(handles.opened) == 4 and pool.idle() == 2
    pool.close()
    assert handles.still_open() == 0 and pool.idle() == 0


class InterruptedPolicy(AdmissiblePolicy):
    """Ctrl-C arrives during the second batched generate call."""

    def generate(self, prompts, sampling, seed=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().generate(prompts, sampling, seed)


@pytest.mark.parametrize("env_cls", [HandleEnv, ReusableHandleEnv])
def test_an_interrupt_closes_every_env_in_play(student_policy, handles, env_cls):
    pool = EnvPool()
    with pytest.raises(KeyboardInterrupt):
        # task 0 ends after one turn (its env is released then), task 3 is cut short
        run_episodes(InterruptedPolicy(student_policy.tokenizer), env_cls, countdown_tasks(0, 3),
                     group_size=2, env_pool=pool)
    assert len(handles.opened) == 4
    kept = 2 if env_cls.reusable else 0     # the two finished episodes' envs, ready for reuse
    assert pool.idle() == kept and handles.still_open() == kept
    pool.close()
    assert handles.still_open() == 0
