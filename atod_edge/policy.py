"""The policy interface every backend implements, and the PyTorch (transformers) backend.

A policy turns a batch of prompts (token ids) into sampled responses with the log-probability of
every sampled token under the policy (temperature 1, i.e. the model's own distribution, which is
what ATOD's lp_S needs). Backends: torch (here), onnxruntime and llama.cpp (atod_edge.backends).
All of them share this interface, so evaluation, training, the TUI and export verification run
the same rollout code whatever the file format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from atod_edge.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 48
    temperature: float = 1.0        # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ("</action>",)


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]           # log pi(token | context) of each sampled token (temperature 1)
    text: str
    finish_reason: str              # "stop" (stop string or end-of-turn token) or "length"


class Policy(ABC):
    """A token-level policy. `tokenizer` is a Hugging Face tokenizer used for prompts and decoding."""

    name: str = "policy"
    tokenizer = None

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                 seed: int | None = None) -> list[Generation]:
        """Sample one response per prompt. Deterministic for a given seed on a given backend."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def stop_token_ids(tokenizer) -> set[int]:
    """End-of-turn tokens: eos plus the chat end marker if the vocabulary has one."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
        if marker in vocab:
            ids.add(int(vocab[marker]))
    return ids


class StopChecker:
    """Decides when one sequence is done: an end-of-turn token or a stop string in its tail."""

    def __init__(self, tokenizer, sampling: SamplingParams):
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.stop_strings = tuple(s for s in sampling.stop if s)
        self.max_new_tokens = sampling.max_new_tokens
        self._tail = 1 + max((len(s) for s in self.stop_strings), default=0)

    def is_done(self, token_ids: list[int]) -> str | None:
        if token_ids and token_ids[-1] in self.stop_ids:
            return "stop"
        if self.stop_strings:
            tail = self.tokenizer.decode(token_ids[-self._tail:], skip_special_tokens=True)
            if any(s in tail for s in self.stop_strings):
                return "stop"
        if len(token_ids) >= self.max_new_tokens:
            return "length"
        return None

    def text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def left_pad(prompts, pad_id: int):
    """Left-pad a batch of prompts: (input ids, attention mask, position ids) as int64 numpy
    arrays. Explicit positions let each sequence see the positions it would see alone."""
    import numpy as np

    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise UserError("empty prompt given to the policy")
    width = max(lengths)
    input_ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(prompts), width), dtype=np.int64)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = p
        attention[i, width - len(p):] = 1
    positions = np.clip(attention.cumsum(-1) - 1, 0, None)
    return input_ids, attention, positions


def sample_next(logits, temperature: float, top_p: float, generator):
    """Sample token ids from [B, V] float32 logits; return (ids, log-probs at temperature 1)."""
    import torch

    logprobs = torch.log_softmax(logits, dim=-1)
    if temperature <= 0:
        ids = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            cumulative = sorted_probs.cumsum(dim=-1)
            drop = cumulative - sorted_probs > top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return ids, logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


class TorchPolicy(Policy):
    """transformers causal LM with a batched KV-cache decode loop (CPU fp32, CUDA bf16 autocast).

    Prompts are left-padded with explicit position ids, so each sequence sees exactly the
    positions it would see alone; finished sequences leave the batch (the cache is compacted).
    """

    def __init__(self, model, tokenizer, name: str = "torch", device: str | None = None):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device) if device else next(model.parameters()).device
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: str | None = None) -> "TorchPolicy":
        from atod_edge.models import load_model

        device = str(torch_device(device))
        model, tokenizer = load_model(path, device=device, dtype=dtype)
        model.eval()
        return cls(model, tokenizer, name=str(path), device=device)

    def generate(self, prompts, sampling: SamplingParams, seed: int | None = None) -> list[Generation]:
        import torch
        from transformers import DynamicCache

        if not prompts:
            return []
        device = self.device
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else int(seed))
        checker = StopChecker(self.tokenizer, sampling)

        input_ids, attention, positions = (torch.from_numpy(a).to(device)
                                           for a in left_pad(prompts, self.pad_id))

        outputs: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        live = list(range(len(prompts)))        # original index of each row still in the batch
        cache = DynamicCache()
        step_input, step_positions = input_ids, positions

        with torch.inference_mode(), _autocast(device):
            while live:
                out = self.model(input_ids=step_input, attention_mask=attention, position_ids=step_positions,
                                 past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
                logits = out.logits[:, -1, :].float()
                ids, lps = sample_next(logits, sampling.temperature, sampling.top_p, generator)
                ids_list, lps_list = ids.tolist(), lps.tolist()   # one host sync per decode step
                keep = []
                for row, orig in enumerate(live):
                    outputs[orig].append(ids_list[row])
                    logprobs[orig].append(lps_list[row])
                    finish[orig] = checker.is_done(outputs[orig])
                    if finish[orig] is None:
                        keep.append(row)
                if len(keep) < len(live):
                    live = [live[r] for r in keep]
                    if not live:
                        break
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    attention, ids = attention[index], ids[index]
                    step_positions = step_positions[index]
                attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
                step_positions = step_positions[:, -1:] + 1
                step_input = ids.unsqueeze(-1)

        return [Generation(outputs[i], logprobs[i], checker.text(outputs[i]), finish[i] or "length")
                for i in range(len(prompts))]


def torch_device(name: str):
    """A torch.device for a user-given name, or a one-line UserError (a typo, or CUDA asked for
    where torch has none) instead of torch's traceback."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device '{name}' (examples: cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}': CUDA is not available here "
                            f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _autocast(device):
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_policy(path: str, device: str = "cpu", **kwargs) -> Policy:
    """Any agent file: an HF checkpoint dir or preset (torch), a .onnx file or ONNX export dir
    (onnxruntime), a .gguf file (llama.cpp)."""
    p = Path(path)
    if p.suffix == ".gguf":
        from atod_edge.backends.llamacpp import LlamaCppPolicy

        return LlamaCppPolicy.load(path, **kwargs)
    is_onnx_dir = p.is_dir() and (p / "model.onnx").is_file() and not list(p.glob("*.safetensors"))
    if p.suffix == ".onnx" or is_onnx_dir:
        from atod_edge.backends.ort import OrtPolicy

        return OrtPolicy.load(path, device=device, **kwargs)
    return TorchPolicy.load(path, device=device, **kwargs)

