"""The tiny presets (tiny-teacher, tiny-student): a byte-level BPE tokenizer trained on the built-in
environments' text, played by the scripted expert and by random actions and rendered the way the
prompts show it, and random-init Llama weights around it.

Data flow: envs + prompts -> `env_corpus` -> `train_tiny_tokenizer` -> one shared tokenizer in the
cache -> `build_tiny` writes a preset directory. presets.py calls `build_tiny`; this module stands
only on cache.py and chatml.py inside models/.
"""

from __future__ import annotations

import random
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from atod_edge import prompts
from atod_edge.envs import list_envs, make_env
from atod_edge.errors import UserError
from atod_edge.io import atomic_path, atomic_write_json, cache_dir, file_sha256
from atod_edge.models.cache import PRESET_CARD, Preset, file_lock, read_card
from atod_edge.models.chatml import CHATML_TEMPLATE, ENDOFTEXT, IM_END, IM_START, SPECIAL_TOKENS

# Bump when the tiny presets' recipe (tokenizer corpus, sizes, init) changes: stale builds rebuild.
TINY_BUILD_VERSION = 4
TINY_VOCAB_SIZE = 4096

# The words an agent prompt is built from, so they get whole tokens even before the prompt
# module settles its exact wording.
SCAFFOLD_TEXT = """\
You are an agent acting in a text environment. Read the task and the latest observation, then
reply with exactly one action. Think briefly if it helps, then give the action.
Task: Goal: Observation: Feedback: Action: Actions: Admissible actions: Valid actions:
Available actions: Your action: Next action: Reward: Score: Turn: Step: Done. Won. Lost.
That action is not valid here. Invalid action. Try one of the admissible actions.
<think> </think> <action> </action> Thought: Answer:
system
user
assistant
"""


def tiny_llama(hidden: int, layers: int, heads: int, ffn: int) -> dict[str, Any]:
    """LlamaConfig fields of a tiny preset."""
    # head_dim 64 and widths that are multiples of 256 keep GGUF K-quants applicable.
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads, intermediate_size=ffn, head_dim=64,
                max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=True, hidden_act="silu", initializer_range=0.02)


def tiny_card_is_current(card: dict, envs: list[str] | None) -> bool:
    """A tiny build is current if made by this recipe version from every built-in env's text
    (one made while an env was missing or broken is rebuilt once all are there)."""
    return card.get("build_version") == TINY_BUILD_VERSION and envs == sorted(list_envs(include_extras=False))


# --------------------------------------------------------------------------------------------
# The tokenizer: trained on the environments' text


def env_corpus(envs: Iterable[str] | None = None, episodes_per_env: int = 200,
               seed: int = 0) -> Iterator[str]:
    """Text the tiny tokenizer is trained on: the built-in envs played by the scripted expert and
    by random actions, their instructions, and the prompt scaffolding around them."""
    yield SCAFFOLD_TEXT
    rng = random.Random(seed)
    for env_name in _available_envs() if envs is None else envs:
        env = make_env(env_name)
        yield env.instructions
        yield getattr(env, "description", "") or ""
        half = episodes_per_env // 2
        for i, task in enumerate(env.tasks("train", episodes_per_env)):
            yield from _play(env, task, expert=i < half, rng=rng)


def _play(env, task, expert: bool, rng: random.Random) -> Iterator[str]:
    """One episode's text, rendered the way prompts show it. Random play mixes admissible actions
    with some malformed ones so the envs' invalid-action feedback is in the corpus too."""
    first = env.reset(task)
    yield first
    history: list[tuple[str, str]] = []
    observation = None
    for turn in range(env.max_turns):
        admissible = list(env.admissible_actions())
        if turn % 4 == 0:
            # Every few turns, the whole prompt: its scaffolding words weigh in the merges.
            for message in prompts.build_messages(env.instructions, first, history, observation,
                                                  admissible):
                yield f"{message['role']}\n{message['content']}"
        else:
            yield " | ".join(admissible)
        if expert:
            action = env.expert_action()
        elif admissible and rng.random() < 0.85:
            action = rng.choice(admissible)
        else:
            words = " ".join(admissible[:3]).split() or ["look"]
            action = " ".join(rng.sample(words, k=min(len(words), 2)))
        yield prompts.format_response(action)
        result = env.step(action)
        observation = result.observation
        history.append((action, observation))
        yield observation
        if result.done:
            break


def _available_envs() -> list[str]:
    """Built-in envs whose modules import (all three once the package is complete)."""
    names = []
    for name in sorted(list_envs(include_extras=False)):
        try:
            make_env(name)
        except UserError as e:
            warnings.warn(f"tiny tokenizer: skipping env '{name}': {e}", stacklevel=2)
            continue
        names.append(name)
    return names


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenizer, so llama.cpp loads it as "gpt-2"),
    ChatML special tokens and chat template, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(x)) == x exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=ENDOFTEXT, eos_token=IM_END, pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT, additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False, model_max_length=2048)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _shared_tiny_tokenizer_dir() -> Path:
    """The one tokenizer both tiny presets copy (built once, so teacher and student match)."""
    path = cache_dir() / "tokenizers" / "tiny-bpe"

    def current() -> bool:
        card = read_card(path)
        return tiny_card_is_current(card, card.get("envs")) and (path / "tokenizer.json").is_file()

    if current():
        return path
    with file_lock(cache_dir() / "locks" / "tiny-bpe.lock"):
        if current():
            return path
        envs = _available_envs()
        start = time.perf_counter()
        tokenizer = train_tiny_tokenizer(env_corpus(envs))
        with atomic_path(path) as tmp:
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / PRESET_CARD, {
                "build_version": TINY_BUILD_VERSION, "envs": envs, "vocab_size": len(tokenizer),
                "train_seconds": round(time.perf_counter() - start, 2)})
    return path


# --------------------------------------------------------------------------------------------
# The weights: random-init Llama


def build_tiny(preset: Preset, out: Path) -> None:
    """Write tiny preset `preset` into the new directory `out` (weights, tokenizer, card)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer_dir = _shared_tiny_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=ids[ENDOFTEXT],
                         eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT], **preset.llama)
    model = _init_llama(config, preset.seed, LlamaForCausalLM, torch)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[ENDOFTEXT], eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
        pad_token_id=ids[ENDOFTEXT])
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    tokenizer_card = read_card(tokenizer_dir)
    atomic_write_json(out / PRESET_CARD, {
        "preset": preset.name, "kind": preset.kind, "description": preset.description,
        "build_version": TINY_BUILD_VERSION, "seed": preset.seed,
        "params": sum(p.numel() for p in model.parameters()),
        "tokenizer_sha256": file_sha256(out / "tokenizer.json"),
        "tokenizer_envs": tokenizer_card.get("envs", []), "dtype": "float32"})


def _init_llama(config, seed: int, model_cls, torch):
    """Random init under a fixed seed, without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config).float().eval()
