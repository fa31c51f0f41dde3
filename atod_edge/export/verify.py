"""Verification of exported files against the PyTorch student they came from.

For every file: logit parity (teacher-forced, every position) on two sets of contexts: held-out
scripted-expert contexts and the student's own (on-policy) turns; greedy agreement; agent parity
on the same seeded eval episodes as the student (paired: success, the paired difference with its
95% interval, invalid-action rate, loop rate, mean turns); size on disk and decode speed.
Thresholds live in VerifyConfig; a file that misses one is marked failing.

    fp32 files (ONNX fp32, GGUF f32): max |logit difference| within a tight tolerance
    GGUF f16: mean KL(student || exported) within a tight cap (f16 rounding moves large
    logits by ~0.1 on a 100M model, so an absolute logit tolerance would not scale)
    quantized files (ONNX int8, GGUF q8_0/q4_k_m): mean KL(student || exported) under a cap,
    and success rate within N points of the student (2 for int8/q8_0, 5 for q4_k_m)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from atod_edge.config import opt
from atod_edge.engine.policy import Policy
from atod_edge.engine.sampling import SamplingParams


@dataclass
class VerifyConfig:
    n_contexts: int = opt(8, "held-out contexts (prompt + expert response) for logit parity", min=1)
    max_context_tokens: int = opt(512, "longest context checked (older tokens are cut)", min=8)
    greedy_tokens: int = opt(24, "tokens generated greedily per context for sequence agreement", min=1)
    n_episodes: int = opt(10, "eval episodes for agent parity (0 skips it)", min=0)
    env: str = opt("", "environment for contexts and agent parity (empty: the env of the checkpoint's "
                        "run, from its config.yaml, else household)")
    on_policy_contexts: int = opt(8, "contexts from the student's own agent-parity episodes (0: none)", min=0)
    max_turns: int = opt(0, "turn limit per parity episode (0: the env's own)", min=0)
    fp32_max_abs_logit: float = opt(1e-3, "max |logit diff| for ONNX fp32 and GGUF f32", min=0)
    kl_f16: float = opt(1e-3, "max mean KL(student||exported), GGUF f16", min=0)
    kl_int8: float = opt(0.1, "max mean KL(student||exported), ONNX int8", min=0)
    kl_q8_0: float = opt(0.02, "max mean KL(student||exported), GGUF q8_0", min=0)
    kl_q4_k_m: float = opt(0.2, "max mean KL(student||exported), GGUF q4_k_m (and other quants)", min=0)
    points_float: float = opt(2.0, "max success-rate difference (points), float files", min=0)
    points_int8: float = opt(2.0, "max success-rate difference (points), ONNX int8", min=0)
    points_q8_0: float = opt(2.0, "max success-rate difference (points), GGUF q8_0", min=0)
    points_q4_k_m: float = opt(5.0, "max success-rate difference (points), GGUF q4_k_m (and other quants)", min=0)
    speed_tokens: int = opt(64, "decode tokens timed per file", min=1)
    fail_on_fallback: bool = opt(False, "treat a quant fallback (tensors kept in another type) as failing")
    device: str = opt("auto", "ONNX Runtime device: auto/cuda requests CUDA first, cpu forces CPU")
    n_threads: int = opt(0, "CPU threads for the runtimes (0: all cores)", min=0)

    def kl_cap(self, kind: str) -> float:
        return {"f16": self.kl_f16, "int8": self.kl_int8, "q8_0": self.kl_q8_0}.get(kind, self.kl_q4_k_m)

    def points_cap(self, kind: str) -> float:
        if kind in FLOAT_KINDS:
            return self.points_float
        return {"int8": self.points_int8, "q8_0": self.points_q8_0}.get(kind, self.points_q4_k_m)


FLOAT_KINDS = ("fp32", "f32", "f16")
DEFAULT_ENV = "household"
LOOP_REPEATS = 3          # an episode loops when one action is taken this many times in a row


def env_name(cfg: VerifyConfig) -> str:
    return cfg.env or DEFAULT_ENV


@dataclass
class Context:
    prompt_ids: list[int]
    target_ids: list[int]      # the expert's response (teacher-forced after the prompt)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.target_ids


# ------------------------------------------------------------------------------------------------
# Held-out contexts


def heldout_contexts(tokenizer, cfg: VerifyConfig) -> tuple[list[Context], str]:
    """Contexts from scripted-expert episodes on the env's eval split (tasks after those used for
    agent parity); synthetic chat prompts when the env cannot run. Returns (contexts, source)."""
    from atod_edge.errors import UserError

    try:
        contexts = _episode_contexts(tokenizer, cfg)
        source = f"{env_name(cfg)} eval episodes (scripted expert)"
    except (ImportError, UserError) as e:
        contexts, source = [], f"synthetic prompts ({env_name(cfg)} unavailable: {e})"
    if not contexts:
        contexts = _synthetic_contexts(tokenizer, cfg)
        source = source if source.startswith("synthetic") else "synthetic prompts"
    return [_truncate(c, cfg.max_context_tokens) for c in contexts], source


def _episode_contexts(tokenizer, cfg: VerifyConfig) -> list[Context]:
    from atod_edge.envs import env_class, env_tasks
    from atod_edge.prompts import build_messages, encode_prompt, format_response
    from atod_edge.rollout.runner import run_scripted

    env_cls = env_class(env_name(cfg))
    tasks = env_tasks(env_cls, "eval", cfg.n_contexts, start=cfg.n_episodes + 1000)
    episodes = run_scripted("expert", env_cls, tasks)
    end = tokenizer.eos_token or ""
    contexts = []
    for i, episode in enumerate(episodes):
        turns = [t for t in episode.turns if t.action]
        if not turns:
            continue
        k = (i * 3) % len(turns)      # spread the checked turn over early, middle and late turns
        history = [(turns[j].action, turns[j + 1].observation) for j in range(k)]
        messages = build_messages(env_cls.instructions, turns[0].observation, history,
                                  None if k == 0 else turns[k].observation, turns[k].admissible)
        prompt = encode_prompt(tokenizer, messages)
        target = tokenizer(format_response(turns[k].action) + end, add_special_tokens=False)["input_ids"]
        contexts.append(Context(list(prompt), list(target)))
    return contexts


def _synthetic_contexts(tokenizer, cfg: VerifyConfig) -> list[Context]:
    from atod_edge.prompts import build_messages, encode_prompt, format_response

    rooms = ["kitchen", "living room", "bathroom", "bedroom", "garage", "office", "hall", "attic"]
    things = ["apple", "mug", "book", "towel", "lamp", "key", "plate", "pen"]
    contexts = []
    for i in range(cfg.n_contexts):
        room, thing = rooms[i % len(rooms)], things[(3 * i) % len(things)]
        task = f"You are in the {room}. Your task is to put a {thing} in the drawer 1."
        admissible = [f"take {thing} 1", "open drawer 1", f"go to {room}", "look"]
        messages = build_messages("Act in a text household.", task, [], None, admissible)
        target = tokenizer(format_response(admissible[i % 4]) + (tokenizer.eos_token or ""),
                           add_special_tokens=False)["input_ids"]
        contexts.append(Context(encode_prompt(tokenizer, messages), list(target)))
    return contexts


def on_policy_contexts(episodes, n: int, max_tokens: int) -> list[Context]:
    """Up to `n` contexts from the student's own episodes: the prompt it saw and the response it
    gave (recorded token ids, never re-tokenized), spread over episodes and over early, middle
    and late turns."""
    queues = []           # per episode: its turns, the first pick first
    for i, episode in enumerate(episodes):
        recorded = [t for t in episode.turns if t.prompt_ids and t.response_ids]
        if recorded:
            k = (i * 3) % len(recorded)
            queues.append([recorded[k]] + recorded[:k] + recorded[k + 1:])
    contexts: list[Context] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        for queue in queues:
            if len(contexts) == n:
                return contexts
            if depth < len(queue):
                turn = queue[depth]
                contexts.append(_truncate(Context(list(turn.prompt_ids), list(turn.response_ids)), max_tokens))
    return contexts


def _truncate(context: Context, max_tokens: int) -> Context:
    overflow = len(context.ids) - max_tokens
    if overflow <= 0:
        return context
    return Context(context.prompt_ids[overflow:], context.target_ids)


# ------------------------------------------------------------------------------------------------
# Metrics


def torch_logits(model, token_ids: Sequence[int]) -> np.ndarray:
    """[T, V] float32 logits of the PyTorch student for one sequence."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(token_ids)], device=model.device))
    return out.logits[0].float().cpu().numpy()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logit_parity(reference: Sequence[np.ndarray], exported: Sequence[np.ndarray]) -> dict:
    """Per-position comparison over all contexts: max |diff|, KL(ref || exported), top-1 match."""
    ref = np.concatenate(list(reference), axis=0)
    got = np.concatenate(list(exported), axis=0)
    if ref.shape != got.shape:
        raise ValueError(f"logit shapes differ: {ref.shape} vs {got.shape}")
    if not np.isfinite(got).all():
        return {"positions": int(ref.shape[0]), "max_abs_logit_diff": float("inf"),
                "mean_kl": float("inf"), "p99_kl": float("inf"), "top1_agreement": 0.0}
    lp_ref, lp_got = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp_ref) * (lp_ref - lp_got)).sum(axis=-1)
    return {
        "positions": int(ref.shape[0]),
        "max_abs_logit_diff": float(np.abs(ref - got).max()),
        "mean_kl": float(kl.mean()),
        "p99_kl": float(np.quantile(kl, 0.99)),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
    }


def greedy_agreement(reference: Sequence, exported: Sequence) -> dict:
    """Fraction of greedy continuations identical to the student's, and mean shared prefix."""
    same, prefix = 0, []
    for a, b in zip(reference, exported):
        same += a.token_ids == b.token_ids
        n = 0
        for x, y in zip(a.token_ids, b.token_ids):
            if x != y:
                break
            n += 1
        prefix.append(n / max(len(a.token_ids), 1))
    return {"greedy_sequence_agreement": same / max(len(reference), 1),
            "greedy_prefix_agreement": float(np.mean(prefix)) if prefix else 0.0}


def greedy_sampling(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=())


def decode_speed(policy: Policy, prompts: Sequence[Sequence[int]], min_tokens: int,
                 min_steps: int = 4) -> dict:
    """First-token latency (prefill + one step) and decode tokens/s, one sequence at a time.

    Each prompt runs twice: 1 new token, then up to `min_tokens` + 1; the difference isolates
    decoding. A prompt whose continuation stops (end-of-turn token) before `min_steps` decode
    steps is too short to time and is skipped; prompts are used until `min_tokens` steps are
    timed. Speed is None when no prompt gave a long enough continuation."""
    policy.generate([prompts[0]], greedy_sampling(2))          # warm-up (allocations, caches)
    first, decode_s, decode_tokens = [], 0.0, 0
    for prompt in prompts:
        t0 = time.perf_counter()
        policy.generate([prompt], greedy_sampling(1))
        t1 = time.perf_counter()
        gen = policy.generate([prompt], greedy_sampling(max(min_tokens - decode_tokens, min_steps) + 1))[0]
        t2 = time.perf_counter()
        first.append(t1 - t0)
        steps = len(gen.token_ids) - 1
        if steps >= min_steps and (t2 - t1) > (t1 - t0):
            decode_s += (t2 - t1) - (t1 - t0)
            decode_tokens += steps
        if decode_tokens >= min_tokens:
            break
    return {"first_token_s": float(np.median(first)),
            "decode_tokens_per_s": decode_tokens / decode_s if decode_tokens else None,
            "decode_tokens_timed": decode_tokens}


def agent_episodes(policy: Policy, cfg: VerifyConfig) -> list:
    """The agent-parity episodes: greedy, on the first cfg.n_episodes eval tasks of the env, seed 0,
    so every backend plays exactly the same episodes (paired)."""
    from atod_edge.envs import env_class, env_tasks
    from atod_edge.rollout.runner import run_episodes

    env_cls = env_class(env_name(cfg))
    tasks = env_tasks(env_cls, "eval", cfg.n_episodes)
    return run_episodes(policy, env_cls, tasks, sampling=SamplingParams(temperature=0.0),
                        seed=0, max_turns=cfg.max_turns or None)


def has_loop(episode, repeats: int = LOOP_REPEATS) -> bool:
    """The same action `repeats` or more times in a row (admissible or not; replies without any
    parseable action count as one and the same non-action)."""
    run, last = 0, object()
    for turn in episode.turns:
        action = turn.action if turn.action is not None else "(no action)"
        run = run + 1 if action == last else 1
        last = action
        if run >= repeats:
            return True
    return False


def paired_interval(file_wins: Sequence[bool], student_wins: Sequence[bool], z: float = 1.96) -> tuple[float, float]:
    """95% interval of the paired success difference (file minus student), Agresti-Min: the
    normal interval after adding 1/2 to each cell of the 2x2 table, so that a few episodes with no
    discordant pair still give an honest width instead of [0, 0]."""
    n = len(file_wins)
    gained = sum(1 for f, s in zip(file_wins, student_wins) if f and not s) + 0.5
    lost = sum(1 for f, s in zip(file_wins, student_wins) if s and not f) + 0.5
    total = n + 2.0
    diff = (gained - lost) / total
    var = ((gained + lost) - (gained - lost) ** 2 / total) / total ** 2
    half = z * float(np.sqrt(max(var, 0.0)))
    return max(diff - half, -1.0), min(diff + half, 1.0)


def agent_summary(episodes, reference=None) -> dict:
    """Success, invalid-action rate, loop rate and mean turns of one file's episodes; with the
    student's `reference` episodes (same tasks, same order): the paired success difference in
    points, its 95% interval (paired_interval) and the number of discordant episodes."""
    n = len(episodes)
    turns = sum(e.num_turns for e in episodes)
    wins = [bool(e.success) for e in episodes]
    summary = {"episodes": n, "successes": sum(wins), "success_rate": sum(wins) / max(n, 1),
               "invalid_rate": sum(e.num_invalid for e in episodes) / max(turns, 1),
               "loop_rate": sum(has_loop(e) for e in episodes) / max(n, 1),
               "mean_turns": turns / max(n, 1)}
    if reference is not None:
        if len(reference) != n or any(e.task_id != r.task_id for e, r in zip(episodes, reference)):
            raise ValueError("paired comparison needs the same tasks in the same order")
        student = [bool(r.success) for r in reference]
        lo, hi = paired_interval(wins, student)
        summary["points_vs_student"] = 100.0 * (sum(wins) - sum(student)) / max(n, 1)
        summary["points_ci95"] = [100.0 * lo, 100.0 * hi]
        summary["discordant"] = sum(w != s for w, s in zip(wins, student))
    return summary


def agent_success(policy: Policy, cfg: VerifyConfig) -> dict:
    """Success rate (greedy, same tasks and seeds for every backend) on cfg.n_episodes, with the
    invalid-action rate, loop rate and mean turns."""
    return agent_summary(agent_episodes(policy, cfg))


def file_bytes(path: Path) -> int:
    """Size on disk of a model file, with ONNX external-data files beside it."""
    total = path.stat().st_size
    for extra in path.parent.glob(path.name + "_data*"):
        total += extra.stat().st_size
    return total
