"""Supervised fine-tuning on demonstration episodes: the teacher bootstrap and the cold start.

The loss is the mean negative log-likelihood of the response tokens (the prompt is masked out);
prompts are built exactly as the rollout engine builds them, so the model is trained on what it
will see. Demonstrations come from the env's scripted expert, a noisy expert (imperfect demos),
or an episodes JSONL file.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from atod_edge.config import load_config, opt
from atod_edge.episode import Episode, read_episodes
from atod_edge.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    env: str = opt("household", "environment name or pkg.module:Class")
    model: str = opt("tiny-teacher", "preset name or checkpoint dir to start from")
    demos: str = opt("expert", "expert | noisy | path to an episodes JSONL")
    noise: float = opt(0.3, "noisy demos: probability of a random admissible action", min=0.0, max=1.0)
    successful_only: bool = opt(False, "train only on demonstrations that succeeded")
    episodes: int = opt(200, "number of demonstration episodes", min=1)
    epochs: int = opt(2, "passes over the demonstrations", min=1)
    lr: float = opt(1e-3, "AdamW learning rate", min=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    batch_size: int = opt(16, "turns per optimizer step", min=1)
    micro_batch: int = opt(16, "turns per forward pass", min=1)
    warmup_steps: int = opt(10, "linear warmup steps", min=0)
    history_turns: int = opt(2, "past turns in the prompt", min=0)
    seed: int = opt(0, "seed for demos and shuffling")
    device: str = opt("cpu", "torch device")
    out: str = opt("runs/sft", "output checkpoint dir")
    eval_episodes: int = opt(50, "episodes evaluated on the eval split at the end (0 = none)", min=0)


def demo_episodes(cfg: SFTConfig) -> list[Episode]:
    from atod_edge.envs import env_class
    from atod_edge.rollout import run_scripted

    if cfg.demos in ("expert", "noisy"):
        env_cls = env_class(cfg.env)
        tasks = env_cls().tasks("train", cfg.episodes)
        episodes = run_scripted(cfg.demos, env_cls, tasks, seed=cfg.seed, noise=cfg.noise)
    else:
        path = Path(cfg.demos)
        if not path.is_file():
            raise UserError(f"demos '{cfg.demos}': not expert, noisy or an existing episodes file")
        try:
            episodes, _ = read_episodes(path)
        except OSError as e:
            raise UserError(f"demos '{cfg.demos}': cannot read it ({e.strerror or type(e).__name__})") from None
        well_formed = [ep for ep in episodes if _is_well_formed(ep)]
        if len(well_formed) < len(episodes):
            logger.warning("%s: skipped %d episode(s) with fields of the wrong type",
                        path, len(episodes) - len(well_formed))
        episodes = well_formed[:cfg.episodes]
    if cfg.successful_only:
        episodes = [ep for ep in episodes if ep.success]
    if not episodes:
        raise UserError(f"no demonstration episodes to train on (demos={cfg.demos})")
    return episodes


def _is_well_formed(episode: Episode) -> bool:
    """The text fields SFT builds prompts from have the right types (a parseable JSON line can
    still hold numbers where text belongs)."""
    def text(value, optional=False):
        return isinstance(value, str) or (optional and value is None)

    return text(episode.final_observation) and all(
        text(t.observation) and text(t.response) and text(t.action, optional=True)
        and (t.admissible is None or (isinstance(t.admissible, list) and all(map(text, t.admissible))))
        for t in episode.turns)


def build_examples(episodes: list[Episode], tokenizer, instructions: str, history_turns: int,
                   ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + end-of-turn) for every valid demonstrated turn."""
    from atod_edge.prompts import encode_prompt
    from atod_edge.rollout import episode_messages

    end = tokenizer.eos_token_id
    examples = []
    for ep in episodes:
        for k, turn in enumerate(ep.turns):
            if not turn.valid or turn.action is None:
                continue
            prompt = encode_prompt(tokenizer, episode_messages(ep, k, instructions, history_turns))
            response = tokenizer(turn.response, add_special_tokens=False)["input_ids"]
            if end is not None:
                response = response + [end]
            examples.append((prompt, response))
    return examples


def train_sft(cfg: SFTConfig, log=print) -> Path:
    """Fine-tune cfg.model on demonstrations and save it (HF layout) to cfg.out, atomically."""
    from atod_edge.envs import env_class
    from atod_edge.io import atomic_path
    from atod_edge.models import load_model
    from atod_edge.policy import torch_device
    from atod_edge.scoring import response_logprobs

    torch_device(cfg.device)  # a one-line error for a bad device name
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, device=cfg.device)
    model.train()
    instructions = env_class(cfg.env).instructions
    episodes = demo_episodes(cfg)
    examples = build_examples(episodes, tokenizer, instructions, cfg.history_turns)
    if not examples:
        raise UserError("the demonstrations hold no valid turns to train on")
    pad = tokenizer.pad_token_id or 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * max(0.0, 1 - s / total))
    rng = random.Random(cfg.seed)
    log(f"sft: {len(episodes)} demos ({sum(e.success for e in episodes)} successful), "
        f"{len(examples)} turns, {cfg.epochs} epochs, {total} steps")
    started, step = time.perf_counter(), 0
    for _epoch in range(cfg.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), cfg.batch_size):
            batch = [examples[i] for i in order[start:start + cfg.batch_size]]
            # sort by length so micro-batches pad little
            batch.sort(key=lambda ex: len(ex[0]) + len(ex[1]))
            n_tokens = sum(len(r) for _, r in batch)
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            for m in range(0, len(batch), cfg.micro_batch):
                chunk = batch[m:m + cfg.micro_batch]
                lps = response_logprobs(model, [p for p, _ in chunk], [r for _, r in chunk], pad_id=pad,
                                        micro_batch=cfg.micro_batch)
                loss = -torch.cat(lps).sum() / n_tokens
                loss.backward()
                loss_value += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            elapsed = time.perf_counter() - started
            eta = elapsed / step * (total - step)
            print(f"\rsft step {step}/{total}  loss {loss_value:.3f}  ETA {eta:.0f}s", end="",
                  file=sys.stderr, flush=True)
    print(file=sys.stderr)
    model.eval()
    out = Path(cfg.out)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    log(f"sft: saved {out} ({time.perf_counter() - started:.0f}s)")
    return out


def sft_command(recipe: str | None, overrides: list[str]) -> int:
    cfg = load_config(SFTConfig, recipe, overrides)
    out = train_sft(cfg)
    if cfg.eval_episodes:
        from atod_edge.evaluate import EvalConfig, evaluate, format_summary, save_eval
        from atod_edge.policy import TorchPolicy

        policy = TorchPolicy.load(str(out), device=cfg.device)
        summary, episodes = evaluate(policy, EvalConfig(env=cfg.env, episodes=cfg.eval_episodes,
                                                        device=cfg.device))
        save_eval(Path(out) / "eval", summary, episodes)
        print(format_summary(summary))
    return 0
