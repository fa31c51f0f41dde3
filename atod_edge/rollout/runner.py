"""The batched rollout engine: many episodes at once, one generation call per turn.

B tasks x G rollouts (each group shares its task, hence its reset) step forward together: every
turn, the prompts of all live episodes go to the policy in one batched call; episodes leave as
they finish. Prompt and response token ids and the rollout log-probs are recorded per turn, so the
teacher later scores exactly the sampled tokens (decoded text is never re-tokenized).

An environment that raises ends only its own episode (recorded in `meta["error"]`); a model that
emits garbage produces invalid actions, which the env answers with feedback.

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
from atod_edge.rollout.episode import Episode, Turn
from atod_edge.engine.policy import Policy
from atod_edge.engine.sampling import SamplingParams
from atod_edge.prompts import build_messages, encode_prompt, encode_prompts, parse_action


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


def _release(pool: EnvPool, env_cls, live: _Live, reuse: bool = True) -> None:
    """The episode is over: its env goes back to the pool (reused only after a clean ending)."""
    if not live.released:
        live.released = True
        pool.release(env_cls, live.env, reuse=reuse and "error" not in live.episode.meta)


def _start(pool: EnvPool, env_cls: Callable[[], Env], task: Task, policy_name: str,
           group: int | None) -> _Live:
    env = pool.acquire(env_cls)
    episode = Episode(env=env.name, task_id=task.task_id, seed=task.seed, split=task.split,
                      policy=policy_name, group=group)
    try:
        obs = env.reset(task)
        admissible = list(env.admissible_actions())
    except Exception as e:  # an env that raises ends only this episode
        episode.meta["error"] = f"env reset failed: {type(e).__name__}: {e}"
        return _Live(env, episode, "", "", [], [], done=True)
    return _Live(env, episode, obs, obs, [], admissible)


def _apply(live: _Live, turn: Turn, action_text: str, max_turns: int) -> None:
    """Step the env with one action and record the outcome on the turn and the episode."""
    try:
        result = live.env.step(action_text)
    except Exception as e:
        live.episode.meta["error"] = f"env step failed: {type(e).__name__}: {e}"
        live.episode.turns.append(turn)
        live.done = True
        return
    info = result.info or {}
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
            live.admissible = list(live.env.admissible_actions())
        except Exception:
            live.admissible = []


def _messages(live: _Live, instructions: str, history_turns: int) -> list[dict]:
    first = not live.history
    return build_messages(instructions, live.task_observation, live.history,
                          None if first else live.observation, live.admissible, history_turns)


def episode_messages(episode: Episode, k: int, instructions: str, history_turns: int = 2) -> list[dict]:
    """The prompt messages of turn k of a recorded episode, exactly as the engine built them
    (SFT on demonstrations trains on the same prompts the agent later sees)."""
    turns = episode.turns
    observations_after = [t.observation for t in turns[1:]] + [episode.final_observation]
    history = [(t.action or "(invalid)", observations_after[j]) for j, t in enumerate(turns[:k])]
    return build_messages(instructions, turns[0].observation, history,
                          None if k == 0 else turns[k].observation, turns[k].admissible or [],
                          history_turns)


def run_episodes(policy: Policy, env: str | Callable[[], Env], tasks: Sequence[Task],
                 group_size: int = 1, sampling: SamplingParams | None = None, seed: int = 0,
                 history_turns: int = 2, max_turns: int | None = None, step: int | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 timings: dict[str, float] | None = None, label_expert: bool = False,
                 env_pool: EnvPool | None = None) -> list[Episode]:
    """Roll out `group_size` episodes for every task with a token-level policy.

    Episodes come back grouped: tasks[0]'s G rollouts first (group index 0), then tasks[1]'s...
    `timings`, if given, accumulates seconds spent building prompts, generating and stepping envs.
    label_expert=True also records, on every turn, the env's scripted expert action in that state
    (`Turn.expert_action`: DAgger labels for SFT on the policy's own states).
    Envs come from `env_pool` (default: DEFAULT_POOL) and go back to it as their episodes end;
    on an exception or interrupt every env still in play is closed before it propagates.
    """
    sampling = sampling or SamplingParams()
    env_cls = env_class(env) if isinstance(env, str) else env
    instructions = getattr(env_cls, "instructions", "")
    turn_limit = max_turns or getattr(env_cls, "max_turns", 30)
    pool = env_pool or DEFAULT_POOL
    lives: list[_Live] = []
    try:
        for g, task in enumerate(tasks):
            for _ in range(group_size):
                lives.append(_start(pool, env_cls, task, policy.name, g))
        for live in lives:
            live.episode.step = step
        with policy.reusing_prefixes():   # every turn's prompt starts with its episode's first tokens
            _roll(policy, lives, instructions, history_turns, sampling, seed, turn_limit, progress, timings,
                  label_expert, lambda live: _release(pool, env_cls, live))
    finally:
        for live in lives:                # cut short (an error, Ctrl-C): close, never reuse
            _release(pool, env_cls, live, reuse=False)
    return [lv.episode for lv in lives]


def _roll(policy, lives, instructions, history_turns, sampling, seed, turn_limit, progress, timings,
          label_expert=False, finished=lambda live: None) -> None:
    """The turn loop of run_episodes: one batched generate call per turn over the live episodes.
    `finished(live)` is called once for every episode as it ends."""
    tokenizer = policy.tokenizer
    turn_index = 0
    while True:
        for live in lives:
            if live.done and not live.released:
                finished(live)
        active = [lv for lv in lives if not lv.done]
        if not active:
            break
        t0 = time.perf_counter()
        prompts = encode_prompts(tokenizer, [_messages(lv, instructions, history_turns) for lv in active])
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
        return live.env.expert_action()
    except Exception:
        return None


def run_scripted(kind: str, env: str | Callable[[], Env], tasks: Sequence[Task], seed: int = 0,
                 noise: float = 0.0, max_turns: int | None = None,
                 env_pool: EnvPool | None = None) -> list[Episode]:
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
        live = _start(pool, env_cls, task, kind, i)
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
                expert = live.env.expert_action()
            except Exception as e:
                live.episode.meta["error"] = f"expert failed: {type(e).__name__}: {e}"
                break
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
        history_turns: int = 2, seed: int = 0) -> tuple[str, str | None, str]:
    """One agent turn outside the batch engine (the TUI's live screen).
    Returns (response text, parsed action or None, reason when invalid)."""
    live = _Live(env=None, episode=None, task_observation=task_observation,  # type: ignore[arg-type]
                 observation=observation, history=list(history), admissible=list(admissible))
    prompt = encode_prompt(policy.tokenizer, _messages(live, instructions, history_turns))
    gen = policy.generate([prompt], sampling or SamplingParams(), seed=seed)[0]
    parsed = parse_action(gen.text)
    return gen.text, parsed.action, parsed.reason
