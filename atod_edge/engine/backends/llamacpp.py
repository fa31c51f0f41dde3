"""llama.cpp policy (llama-cpp-python): a GGUF file, one sequence at a time with a KV cache.

Prompt token ids from the HF tokenizer (saved next to the GGUF file) go straight to llama.cpp:
text is never re-tokenized, so the ids match every other backend exactly. The KV cache is
float32 by default (type_k = type_v = 0): with llama.cpp's default f16 cache, logits drift
~1e-3 from PyTorch, which matters for log-prob parity. With prefix_cache=True, consecutive prompts
that share a prefix (the system prompt, earlier turns) reuse the cached part: faster, but the
split evaluation can flip near-tied greedy choices on f16/quantized files, so results would
depend on prompt order; it is off by default to keep "same seed, same output".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from atod_edge.errors import UserError
from atod_edge.engine.context import check_fits
from atod_edge.engine.policy import Generation, Policy
from atod_edge.engine.sampling import SamplingParams, StopChecker, sample_next

GGML_TYPE_F32 = 0


def find_tokenizer_dir(gguf_path: Path) -> Path:
    """The HF tokenizer saved beside the GGUF file (or one level up, for files in a subfolder)."""
    for folder in (gguf_path.parent, gguf_path.parent.parent):
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return folder
    raise UserError(f"no Hugging Face tokenizer next to {gguf_path} (export writes one; "
                    "copy tokenizer.json and tokenizer_config.json beside the .gguf file)")


def trained_context(file: Path) -> int:
    """The context length the GGUF file declares ({arch}.context_length)."""
    try:
        import gguf
    except ImportError:     # llama-cpp-python does not need the gguf package: assume a usual size
        return 4096
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as e:   # gguf-py on a truncated file: "cannot reshape array of size ..."
        raise UserError(f"{file} is not a readable GGUF file (truncated or damaged? "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for name, field in reader.fields.items():
        if name.endswith(".context_length"):
            return int(field.parts[field.data[0]][0])
    return 4096


class LlamaCppPolicy(Policy):
    def __init__(self, llm, tokenizer, name: str = "llama.cpp", logits_all: bool = False,
                 prefix_cache: bool = False):
        self.llm = llm
        self.tokenizer = tokenizer
        self.name = name
        self.logits_all = logits_all
        self.prefix_cache = prefix_cache
        self.n_vocab = llm.n_vocab()
        self.context_length = llm.n_ctx()

    @classmethod
    def load(cls, path: str, n_threads: int | None = None, n_ctx: int | None = None,
             logits_all: bool = False, f32_cache: bool = True, prefix_cache: bool = False,
             **_ignored) -> "LlamaCppPolicy":
        """Open a .gguf file. `_ignored` swallows generic options (e.g. device) other backends take."""
        try:
            import llama_cpp
        except ImportError:
            raise UserError("running .gguf models needs llama-cpp-python (pip install 'atod-edge[export]')") from None
        from atod_edge.models.loading import load_tokenizer_dir

        file = Path(path)
        if not file.is_file():
            raise UserError(f"no GGUF file at {file}")
        folder = find_tokenizer_dir(file)
        tokenizer = load_tokenizer_dir(folder, f"the tokenizer beside {file}")
        cache_type = GGML_TYPE_F32 if f32_cache else None
        kwargs = dict(type_k=cache_type, type_v=cache_type) if f32_cache else {}
        n_ctx = int(n_ctx or min(trained_context(file), 4096))
        try:
            llm = llama_cpp.Llama(model_path=str(file), n_ctx=n_ctx,
                                  n_threads=int(n_threads or os.cpu_count() or 1),
                                  logits_all=logits_all, flash_attn=False, verbose=False, **kwargs)
        except ValueError as e:   # llama-cpp-python's "Failed to load model from file"
            raise UserError(f"llama.cpp cannot load {file}: {e}") from None
        if llm.n_vocab() < len(tokenizer):
            raise UserError(f"{file}: the GGUF vocabulary ({llm.n_vocab()}) is smaller than the "
                            f"tokenizer beside it ({len(tokenizer)}): they do not belong together")
        return cls(llm, tokenizer, name=str(path), logits_all=logits_all, prefix_cache=prefix_cache)

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32)  # copies

    def _feed_prompt(self, prompt: Sequence[int]) -> None:
        """Evaluate `prompt`, reusing the cached prefix it shares with what is in the KV cache."""
        cached = self.llm.input_ids[: self.llm.n_tokens] if self.prefix_cache else []
        common = 0
        for a, b in zip(cached, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)     # always evaluate one token to get fresh logits
        self.llm.n_tokens = common                 # eval() drops cache entries past n_tokens
        self.llm.eval(list(prompt[common:]))

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """[T, V] float32 logits of one sequence: for parity checks (needs logits_all=True)."""
        if not self.logits_all:
            raise ValueError("LlamaCppPolicy.logits needs the model loaded with logits_all=True")
        self.llm.reset()
        self.llm.eval(list(token_ids))
        return np.array(self.llm.scores[: len(token_ids)], dtype=np.float32)

    def generate(self, prompts, sampling: SamplingParams, seed: int | None = None) -> list[Generation]:
        import torch

        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        checker = StopChecker(self.tokenizer, sampling)
        if any(len(prompt) == 0 for prompt in prompts):
            raise UserError("empty prompt given to the policy")
        check_fits(prompts, sampling.max_new_tokens, self.llm.n_ctx(), "llama.cpp", "load with a larger n_ctx")
        results = []
        for prompt in prompts:
            self._feed_prompt(prompt)
            tokens: list[int] = []
            logprobs: list[float] = []
            while True:
                logits = torch.from_numpy(self._last_logits())[None]
                ids, lps = sample_next(logits, sampling.temperature, sampling.top_p, generator)
                tokens.append(int(ids[0]))
                logprobs.append(float(lps[0]))
                finish = checker.is_done(tokens)
                if finish is not None:
                    break
                self.llm.eval([tokens[-1]])
            results.append(Generation(tokens, logprobs, checker.text(tokens), finish))
        return results

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.close()
