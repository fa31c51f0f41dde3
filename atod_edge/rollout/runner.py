"""The batched rollout engine: many episodes at once, one generation call per turn.

B tasks x G rollouts (each group shares its task, hence its reset) step forward together: every
turn, the prompts of all live episodes go to the policy in one batched call; episodes leave as
they finish. Prompt and response token ids and the rollout log-probs are recorded per turn, so the
teacher later scores exactly the sampled tokens (decoded text is never re-tokenized).

An environment that raises, or whose reset() / step() / expert_action() takes longer than
`env_step_timeout` seconds (rollout.env_calls), ends only its own episode (recorded in
`meta["error"]`, counted by `env_errors`); an env that returns a value of the wrong type (a tuple
from step(), a str reward, a non-str observation) is a bug in the env and stops the run with one
line naming its class, the method and the field (envs.base.EnvProtocolError). A model that emits
garbage produces invalid actions, which the env answers with feedback. Prompts are fitted to the
model's context (rollout.budget): cut, oldest history first, never an unbounded allocation.

Env instances come from an `EnvPool`: each episode gets its own, and when the episode ends the
engine closes it (`env.close()`, optional in the protocol) or, for an env class that declares
`reusable = True`, keeps it for a later episode; an episode cut short by an error or an interrupt
closes its env in any case.
"""

from __future__ import annotations

import atexit
import random
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

from atod_edge.envs import Env, Task, env_class
from atod_edge.errors import UserError
from atod_edge.envs.base import (EnvProtocolError, checked_action, checked_actions, checked_observation,
                                 checked_step, env_label)
from atod_edge.rollout.budget import PromptFitter, prompt_budget
from atod_edge.rollout.env_calls import ENV_CALL_ERRORS, ENV_STEP_TIMEOUT, EnvTimeout, call_with_deadline
from atod_edge.rollout.episode import Episode, Turn
from atod_edge.engine.policy import Policy
from atod_edge.engine.sampling import SamplingParams
from atod_edge.prompts import build_messages, parse_action


def close_env(env) -> None:
    """Call the env's optional close(); a failing close is a warning, not the end of the run."""
    close = getattr(env, "close", None)
    if callable(close):
        try:
            close()
        except Exception as e:
            warnings.warn(f"{type(env).__name__}.close() failed: {type(e).__name__}: {e}", stacklevel=2)


class EnvPool:
    """Where the engine gets env instances and returns them when an episode is over.

    acquire() makes a new instance, or hands out an idle one of a class with `reusable = True`;
    release() takes it back: kept idle for reuse (a reusable env whose episode ended normally)
    or closed (every other case). close() closes the idle ones. So a reusable env that holds a
    process costs at most as many processes as episodes run at once, over any number of calls.
    """

    def __init__(self) -> None:
        self._idle: dict[Callable[[], Env], list[Env]] = {}

    def acquire(self, env_cls: Callable[[], Env]) -> Env:
        idle = self._idle.get(env_cls)
        return idle.pop() if idle else env_cls()

    def release(self, env_cls: Callable[[], Env], env: Env, reuse: bool = True) -> None:
        if reuse and getattr(env, "reusable", False):
            self._idle.setdefault(env_cls, []).append(env)
        else:
            close_env(env)

    def idle(self) -> int:
        return sum(len(envs) for envs in self._idle.values())

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for env in (e for envs in idle.values() for e in envs):
            close_env(env)


#: the pool run_episodes / run_scripted use unless given one; its idle envs are closed at exit
DEFAULT_POOL = EnvPool()
atexit.register(DEFAULT_POOL.close)


@dataclass
class _Live:
    """One episode in flight."""

    env: Env
    episode: Episode
    task_observation: str
    observation: str
    history: list[tuple[str, str]]
    admissible: list[str]
    done: bool = False
    released: bool = False   # its env went back to the pool
    timeout: float | None = None   # seconds an env call may take (None: no limit)
    hung: bool = False       # an env call ran past the deadline: the env is closed, never reused


def _call(live: _Live, method: str, *args):
    """live.env.<method>(*args) within the episode's deadline (EnvTimeout past it)."""
    return call_with_deadline(getattr(live.env, method), *args, timeout=live.timeout,
                              what=f"env {env_label(live.env)}: {method}()")


def _fail(live: _Live, what: str, error: BaseException) -> None:
    """An env call raised or hung: the episode ends with the error recorded."""
    live.hung = live.hung or isinstance(error, EnvTimeout)
    live.episode.meta["error"] = f"{what}: {type(error).__name__}: {error}"
    live.done = True


def env_errors(episodes: Sequence[Episode]) -> int:
    """How many episodes ended by an env error (raised, hung, or its expert failed)."""
    return sum(1 for ep in episodes if "error" in ep.meta)


def _release(pool: EnvPool, env_cls, live: _Live, reuse: bool = True) -> None:
    """The episode is over: its env goes back to the pool (reused only after a clean ending);
    an env that hung is closed within the deadline (its close() may hang too) and dropped."""
    if not live.released:
        live.released = True
        if live.hung:
            try:
                call_with_deadline(close_env, live.env, timeout=live.timeout, what="close()")
            except EnvTimeout:
                warnings.warn(f"env {env_label(live.env)}: close() hung; the env is left behind", stacklevel=2)
        else:
            pool.release(env_cls, live.env, reuse=reuse and "error" not in live.episode.meta)


def _start(pool: EnvPool, env_cls: Callable[[], Env], task: Task, policy_name: str,
           group: int | None, timeout: float | None = None) -> _Live:
    try:
        env = pool.acquire(env_cls)
    except UserError:               # the env's own one-line message (e.g. a missing optional extra)
        raise
    except ENV_CALL_ERRORS as e:  # a constructor that raises ends only this episode
        episode = Episode(env=str(getattr(env_cls, "name", "")), task_id=task.task_id, seed=task.seed,
                          split=task.split, policy=policy_name, group=group)
        episode.meta["error"] = f"env constructor failed: {type(e).__name__}: {e}"
        return _Live(None, episode, "", "", [], [], done=True, released=True)  # type: ignore[arg-type]
    episode = Episode(env=env.name, task_id=task.task_id, seed=task.seed, split=task.split,
                      policy=policy_name, group=group)
    live = _Live(env, episode, "", "", [], [], timeout=timeout)
    try:
        obs = _call(live, "reset", task)
        admissible = _call(live, "admissible_actions")
    except ENV_CALL_ERRORS as e:  # an env that raises ends only this episode
        _fail(live, "env reset failed", e)
        return live
    try:
        live.task_observation = live.observation = checked_observation(env, obs, "reset()")
        live.admissible = checked_actions(env, admissible)
    except EnvProtocolError:
        _release(pool, env_cls, live, reuse=False)
        raise
    return live


def _apply(live: _Live, turn: Turn, action_text: str, max_turns: int) -> None:
    """Step the env with one action and record the outcome on the turn and the episode."""
    try:
        raw = _call(live, "step", action_text)
    except ENV_CALL_ERRORS as e:
        live.episode.turns.append(turn)
        _fail(live, "env step failed", e)
        return
    result = checked_step(live.env, raw)
    info = result.info
    turn.valid = turn.valid and bool(info.get("valid", True))
    turn.feedback = (turn.feedback or str(info.get("feedback", ""))) if not turn.valid else ""
    turn.reward = float(result.reward)
    turn.done = bool(result.done) or len(live.episode.turns) + 1 >= max_turns
    live.episode.turns.append(turn)
    live.history.append((action_text if action_text else "(invalid)", result.observation))
    live.observation = result.observation
    live.admissible = list(info.get("admissible") or [])
    if turn.done:
        live.done = True
        live.episode.reward = float(result.reward)
        live.episode.score = float(info.get("score", result.reward))
        live.episode.success = bool(info.get("won", False))
        live.episode.final_observation = result.observation
    elif not live.admissible:
        try:
            admissible = _call(live, "admissible_actions")
        except EnvTimeout as e:
            _fail(live, "env admissible_actions failed", e)
            return
        except Exception:   # the env's own error: no actions offered
            admissible = []
        live.admissible = checked_actions(live.env, admissible)


def _prompt_parts(live: _Live) -> tuple:
    """What build_messages takes for this episode's next turn (rollout.budget.PromptParts)."""
    first = not live.history
    return live.task_observation, live.history, None if first else live.observation, live.admissible


def episode_messages(episode: Episode, k: int, instructions: str, history_turns: int = 2) -> list[dict]:
    """The prompt messages of turn k of a recorded episode, exactly as the engine built them
    (SFT on demonstrations trains on the same prompts the agent later sees)."""
    return build_messages(instructions, *episode_prompt_parts(episode, k), history_turns)


def episode_prompt_parts(episode: Episode, k: int) -> tuple:
    """What build_messages takes for turn k of a recorded episode (rollout.budget.PromptParts):
    a demonstration's prompt goes through the same PromptFitter cut as a rollout's."""
    turns = episode.turns
    observations_after = [t.observation for t in turns[1:]] + [episode.final_observation]
    history = [(t.action or "(invalid)", observations_after[j]) for j, t in enumerate(turns[:k])]
    return turns[0].observation, history, None if k == 0 else turns[k].observation, turns[k].admissible or []


def run_episodes(policy: Policy, env: str | Callable[[], Env], tasks: Sequence[Task],
                 group_size: int = 1, sampling: SamplingParams | None = None, seed: int = 0,
                 history_turns: int = 2, max_turns: int | None = None, step: int | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 timings: dict[str, float] | None = None, label_expert: bool = False,
                 env_pool: EnvPool | None = None, chat_template_kwargs: dict | None = None,
                 env_step_timeout: float | None = ENV_STEP_TIMEOUT,
                 max_prompt_tokens: int | None = None) -> list[Episode]:
    """Roll out `group_size` episodes for every task with a token-level policy.

    Episodes come back grouped: tasks[0]'s G rollouts first (group index 0), then tasks[1]'s...
    `timings`, if given, accumulates seconds spent building prompts, generating and stepping envs.
    label_expert=True also records, on every turn, the env's scripted expert action in that state
    (`Turn.expert_action`: DAgger labels for SFT on the policy's own states).
    Envs come from `env_pool` (default: DEFAULT_POOL) and go back to it as their episodes end;
    on an exception or interrupt every env still in play is closed before it propagates.
    chat_template_kwargs: the chat template's extra variables (prompts.render_prompt).
    env_step_timeout: seconds an env's reset/step/expert call may take (None or 0: no limit).
    max_prompt_tokens: a prompt budget below the model's context less max_new_tokens (None: that).
    """
    sampling = sampling or SamplingParams()
    env_cls = env_class(env) if isinstance(env, str) else env
    instructions = getattr(env_cls, "instructions", "")
    turn_limit = max_turns or getattr(env_cls, "max_turns", 30)
    pool = env_pool or DEFAULT_POOL
    fitter = PromptFitter(policy.tokenizer, instructions, history_turns,
                          prompt_budget(policy, sampling.max_new_tokens, max_prompt_tokens), chat_template_kwargs)
    lives: list[_Live] = []
    try:
        for g, task in enumerate(tasks):
            for _ in range(group_size):
                lives.append(_start(pool, env_cls, task, policy.name, g, env_step_timeout))
        for live in lives:
            live.episode.step = step
        with policy.reusing_prefixes():   # every turn's prompt starts with its episode's first tokens
            _roll(policy, lives, fitter, sampling, seed, turn_limit, progress, timings,
                  label_expert, lambda live: _release(pool, env_cls, live))
    finally:
        for live in lives:                # cut short (an error, Ctrl-C): close, never reuse
            _release(pool, env_cls, live, reuse=False)
    return [lv.episode for lv in lives]


def _roll(policy, lives, fitter: PromptFitter, sampling, seed, turn_limit, progress, timings,
          label_expert=False, finished=lambda live: None) -> None:
    """The turn loop of run_episodes: one batched generate call per turn over the live episodes.
    `finished(live)` is called once for every episode as it ends."""
    turn_index = 0
    while True:
        for live in lives:
            if live.done and not live.released:
                finished(live)
        active = [lv for lv in lives if not lv.done]
        if not active:
            break
        t0 = time.perf_counter()
        fitted = fitter.encode([_prompt_parts(lv) for lv in active])
        prompts = [ids for ids, _ in fitted]
        for live, (_, cut) in zip(active, fitted):
            if cut:                       # the prompt was cut to fit the context (rollout.budget)
                live.episode.meta["prompt_cuts"] = live.episode.meta.get("prompt_cuts", 0) + 1
                live.episode.meta["prompt_cut"] = cut
        t1 = time.perf_counter()
        generations = policy.generate(prompts, sampling, seed=seed * 1_000_003 + turn_index)
        t2 = time.perf_counter()
        for live, prompt_ids, gen in zip(active, prompts, generations):
            parsed = parse_action(gen.text)
            turn = Turn(observation=live.observation, response=gen.text, action=parsed.action,
                        valid=parsed.action is not None, feedback=parsed.reason,
                        admissible=live.admissible or None, prompt_ids=list(prompt_ids),
                        response_ids=list(gen.token_ids), student_logprobs=list(gen.logprobs),
                        finish_reason=gen.finish_reason)
            if label_expert:
                turn.expert_action = _expert_label(live)
            _apply(live, turn, parsed.action or "", turn_limit)
        if timings is not None:
            t3 = time.perf_counter()
            for key, seconds in (("prompt", t1 - t0), ("generate", t2 - t1), ("env", t3 - t2)):
                timings[key] = timings.get(key, 0.0) + seconds
        turn_index += 1
        if progress:
            progress(sum(lv.done for lv in lives), len(lives))


def _expert_label(live: _Live) -> str | None:
    """The scripted expert's action in this episode's current state; None when the expert fails
    (a label is lost, not the episode)."""
    try:
        action = _call(live, "expert_action")
    except ENV_CALL_ERRORS as e:
        live.hung = live.hung or isinstance(e, EnvTimeout)
        return None
    return None if action is None else checked_action(live.env, action)


def run_scripted(kind: str, env: str | Callable[[], Env], tasks: Sequence[Task], seed: int = 0,
                 noise: float = 0.0, max_turns: int | None = None,
                 env_pool: EnvPool | None = None, env_step_timeout: float | None = ENV_STEP_TIMEOUT) -> list[Episode]:
    """Episodes from an action-level policy: "expert", "random" (admissible), "noisy" (the
    expert, but with probability `noise` a random admissible action: imperfect demos), or
    "dart" (DART-style: executed like "noisy", except that the noise also replays stale actions
    of earlier turns, which are often invalid now; every turn records the expert's action in
    its state as `expert_action`, so SFT learns to recover from mistakes, its own included)."""
    if kind not in ("expert", "random", "noisy", "dart"):
        raise ValueError(f"unknown scripted policy '{kind}'")
    env_cls = env_class(env) if isinstance(env, str) else env
    turn_limit = max_turns or getattr(env_cls, "max_turns", 30)
    pool = env_pool or DEFAULT_POOL
    episodes = []
    for i, task in enumerate(tasks):
        rng = random.Random(seed * 1_000_003 + i)
        live = _start(pool, env_cls, task, kind, i, env_step_timeout)
        try:
            _play_scripted(kind, live, rng, noise, turn_limit)
        finally:
            _release(pool, env_cls, live, reuse=live.done)   # reused only after a complete episode
        episodes.append(live.episode)
    return episodes


def _play_scripted(kind: str, live: _Live, rng: random.Random, noise: float, turn_limit: int) -> None:
    """One episode of run_scripted's action-level policy, to its end."""
    seen: dict[str, None] = {}   # every action offered so far, in order (stale ones for dart)
    while not live.done:
        expert = None
        if kind in ("expert", "dart") or (kind == "noisy" and rng.random() >= noise):
            try:
                expert = _call(live, "expert_action")
            except ENV_CALL_ERRORS as e:
                _fail(live, "expert failed", e)
                break
            if expert is not None:
                checked_action(live.env, expert)
        seen.update(dict.fromkeys(live.admissible))
        if kind == "random" or (kind == "noisy" and expert is None):
            action = rng.choice(live.admissible) if live.admissible else "look"
        elif kind == "dart" and rng.random() < noise:
            action = rng.choice(list(seen) if rng.random() < 0.5 and seen else live.admissible or [expert])
        else:
            action = expert
        turn = Turn(observation=live.observation, response=f"<action>{action}</action>",
                    action=action, admissible=live.admissible or None,
                    expert_action=expert if kind == "dart" else None)
        _apply(live, turn, action, turn_limit)


def act(policy: Policy, instructions: str, task_observation: str, history: list[tuple[str, str]],
        observation: str, admissible: list[str], sampling: SamplingParams | None = None,
        history_turns: int = 2, seed: int = 0, chat_template_kwargs: dict | None = None,
        max_prompt_tokens: int | None = None) -> tuple[str, str | None, str]:
    """One agent turn outside the batch engine (the TUI's live screen), its prompt fitted to the
    model's context as in run_episodes. Returns (response text, parsed action or None, reason
    when invalid)."""
    sampling = sampling or SamplingParams()
    fitter = PromptFitter(policy.tokenizer, instructions, history_turns,
                          prompt_budget(policy, sampling.max_new_tokens, max_prompt_tokens), chat_template_kwargs)
    parts = (task_observation, list(history), observation if history else None, list(admissible))
    prompt, _ = fitter.encode([parts])[0]
    gen = policy.generate([prompt], sampling, seed=seed)[0]
    parsed = parse_action(gen.text)
    return gen.text, parsed.action, parsed.reason
