"""Demonstrations for supervised fine-tuning (sft.py): the episodes to imitate and the
(prompt, response) token pairs built from them, the first stage of an SFT run.

Episodes come from the env's scripted expert, a noisy expert (imperfect demos), DART-style demos
(noisy execution, every state labelled with the expert's action), DAgger demos (the start
model's own sampled episodes, labelled the same way; they need the model, see dagger_episodes),
a mix of kinds, or an episodes JSONL file. Prompts are built exactly as the rollout engine
builds them (rollout.runner.episode_messages), so the model is trained on what it will see.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from atod_edge.errors import UserError
from atod_edge.io import atomic_path
from atod_edge.rollout.episode import Episode, read_episodes
from atod_edge.train.config import SFTConfig
from atod_edge.train.run_log import format_duration

logger = logging.getLogger(__name__)

GENERATED_DEMOS = ("expert", "noisy", "dart", "dagger")


def demo_episodes(cfg: SFTConfig, dagger: Callable[[list], list[Episode]] | None = None) -> list[Episode]:
    """The demonstrations cfg.demos names: one generated kind, a mix of kinds joined by "+"
    (e.g. "dart+dagger": consecutive equal shares of the train tasks, one per kind), or a
    file. `dagger(tasks)` makes the dagger demos (it needs the model)."""
    from atod_edge.envs import env_class, env_tasks
    from atod_edge.rollout.runner import run_scripted

    kinds = cfg.demos.split("+")
    if all(kind in GENERATED_DEMOS for kind in kinds):
        env_cls = env_class(cfg.env)
        tasks = env_tasks(env_cls, "train", cfg.episodes, start=cfg.demo_start)
        episodes = []
        for i, kind in enumerate(kinds):
            share = tasks[i * len(tasks) // len(kinds):(i + 1) * len(tasks) // len(kinds)]
            if kind != "dagger":
                episodes += run_scripted(kind, env_cls, share, seed=cfg.seed, noise=cfg.noise)
            elif dagger is None:
                raise UserError("dagger demos need a model to roll out (train_sft makes them)")
            else:
                episodes += dagger(share)
    else:
        path = Path(cfg.demos)
        if not path.is_file():
            raise UserError(f"demos '{cfg.demos}': not expert, noisy, dart, dagger (or a mix like dart+dagger) "
                            "or an existing episodes file")
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


def dagger_episodes(cfg: SFTConfig, tasks: list, work: Path, model=None, tokenizer=None, log=print,
                    ) -> list[Episode]:
    """DAgger demos (Ross et al., 2011): the start model's own episodes on `tasks` (consecutive
    train-split tasks), sampled at cfg.rollout_temperature by the batched engine, every turn
    labelled with the scripted expert's action in that state. SFT on them teaches recovery from the
    states the model's own mistakes reach, which expert and DART demos cover only by chance.

    Saved to <work>/dagger_demos.jsonl (atomically). `model`/`tokenizer`: the start model, in a
    fresh run. A resumed run, whose model is a checkpoint and no longer the start model, passes
    none: the saved demos are read back (or, if they are missing, cfg.model is loaded to redo them)."""
    from atod_edge.rollout.episode import write_episodes
    from atod_edge.evaluate.evaluate import EvalConfig, evaluate
    from atod_edge.models.loading import load_model
    from atod_edge.engine.policy import TorchPolicy

    if not tasks:
        return []
    path = work / "dagger_demos.jsonl"
    if model is None and path.is_file():
        episodes, skipped = read_episodes(path)
        if not skipped and len(episodes) == len(tasks):
            log(f"sft: {len(episodes)} dagger demos read back from {path}")
            return episodes
    if model is None:
        model, tokenizer = load_model(cfg.model, device=cfg.device)
    was_training = model.training
    model.eval()
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        rate = done / (time.perf_counter() - started)
        eta = format_duration((total - done) / rate)
        print(f"\rsft: dagger demos {done}/{total} | {rate:.1f} episodes/s | ETA {eta}   ",
              end="" if done < total else "\n", file=sys.stderr, flush=True)

    # the eval code path on consecutive train tasks (64 concurrent episodes, the same seeds)
    rollouts = EvalConfig(env=cfg.env, split="train", episodes=len(tasks), start=tasks[0].index,
                          temperature=cfg.rollout_temperature, history_turns=cfg.history_turns,
                          seed=cfg.seed, device=cfg.device, chat_template_kwargs=cfg.chat_template_kwargs)
    summary, episodes = evaluate(TorchPolicy(model, tokenizer, name=f"dagger:{cfg.model}"), rollouts,
                                 progress=progress, label_expert=True)
    model.train(was_training)
    log(f"sft: dagger demos from {cfg.model}: success {summary['success']:.1%}, invalid actions "
        f"{summary['invalid_rate']:.1%}, {summary['turns']:.1f} turns")
    with atomic_path(path) as tmp:
        write_episodes(tmp, episodes)
    return episodes


def _is_well_formed(episode: Episode) -> bool:
    """The text fields SFT builds prompts from have the right types (a parseable JSON line can
    still hold numbers where text belongs)."""
    def text(value, optional=False):
        return isinstance(value, str) or (optional and value is None)

    return text(episode.final_observation) and all(
        text(t.observation) and text(t.response) and text(t.action, optional=True)
        and text(t.expert_action, optional=True)
        and (t.admissible is None or (isinstance(t.admissible, list) and all(map(text, t.admissible))))
        for t in episode.turns)


def build_examples(episodes: list[Episode], tokenizer, instructions: str, history_turns: int,
                   chat_template_kwargs: dict | None = None, context: int | None = None,
                   counts: dict | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + end-of-turn) for every valid demonstrated turn, and for every
    turn labelled with an expert action (dart demos), whatever was executed there. The prompts
    are the rollout engine's, with the same chat_template_kwargs.

    context: the model's context (max_position_embeddings; None: no limit). A turn whose prompt
    plus response is longer gets its prompt cut by the rollout engine's rule (rollout.budget:
    oldest history first, then the observation's and the task's tails) to the context less its
    response; one that cannot be cut to fit is skipped. Both are counted (in `counts`, keys "cut"
    and "skipped") and logged as one warning: no turn runs past the position embeddings."""
    from atod_edge.engine.context import ContextOverflow
    from atod_edge.prompts import encode_prompt, format_response
    from atod_edge.rollout.budget import PromptFitter
    from atod_edge.rollout.runner import episode_messages, episode_prompt_parts

    end = tokenizer.eos_token_id
    examples = []
    cut = skipped = 0
    for ep in episodes:
        for k, turn in enumerate(ep.turns):
            if turn.expert_action:
                target = format_response(turn.expert_action)
            elif turn.valid and turn.action is not None:
                target = turn.response
            else:
                continue
            prompt = encode_prompt(tokenizer, episode_messages(ep, k, instructions, history_turns),
                                   chat_template_kwargs)
            response = tokenizer(target, add_special_tokens=False)["input_ids"]
            if end is not None:
                response = response + [end]
            if context is not None and len(prompt) + len(response) > context:
                budget = context - len(response)
                try:
                    if budget < 1:
                        raise ContextOverflow("the response alone fills the context")
                    fitter = PromptFitter(tokenizer, instructions, history_turns, budget, chat_template_kwargs)
                    prompt = fitter.encode([episode_prompt_parts(ep, k)])[0][0]
                except ContextOverflow:
                    prompt = None
                if prompt is None or len(prompt) + len(response) > context:
                    skipped += 1
                    continue
                cut += 1
            examples.append((prompt, response))
    if cut or skipped:
        logger.warning("%d demonstrated turn(s) longer than the model's context (%d tokens): %d prompt(s) cut "
                       "to fit (oldest history first, then the observation's tail), %d skipped (too long "
                       "even cut)", cut + skipped, context, cut, skipped)
    if counts is not None:
        counts.update(cut=cut, skipped=skipped)
    return examples
