"""ONNX Runtime policy: a batched KV-cache decode loop over an optimum-exported model.onnx.

The graph (task text-generation-with-past) takes input_ids, attention_mask, position_ids and
past_key_values.N.key/value and returns logits and present.N.key/value. Prompts are left-padded
with explicit position ids, exactly like TorchPolicy, so a sequence sees the same positions in a
batch as alone; finished sequences leave the batch and their cache rows are dropped. Sampling
and log-probs go through atod_edge.engine.sampling.sample_next, the same code every backend uses.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from atod_edge.errors import UserError
from atod_edge.engine.policy import Generation, Policy
from atod_edge.engine.context import check_fits, model_context
from atod_edge.engine.sampling import SamplingParams, StopChecker, left_pad, sample_next

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")


def onnx_file(path: str | Path) -> Path:
    """The .onnx file for a file path or an export directory holding model.onnx."""
    p = Path(path)
    file = p / "model.onnx" if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"no ONNX model at {file}")
    return file


def providers_for(device: str) -> list[str]:
    """Execution providers to request: CUDA first (falls back to CPU when CUDA is unusable)."""
    if device in ("auto", "gpu") or device.startswith("cuda"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtPolicy(Policy):
    def __init__(self, session, tokenizer, name: str = "onnxruntime", context_length: int | None = None):
        self.session = session
        self.context_length = context_length   # from the config.json beside the file (load)
        self.tokenizer = tokenizer
        self.name = name
        self.providers = list(session.get_providers())   # what the session really got
        inputs = {i.name: i for i in session.get_inputs()}
        self.input_names = set(inputs)
        self.past_names = sorted((n for n in inputs if _PAST.fullmatch(n)),
                                 key=lambda n: (int(_PAST.fullmatch(n).group(1)), n))
        self.output_names = [o.name for o in session.get_outputs()]
        if self.past_names:
            shape = inputs[self.past_names[0]].shape       # [batch, kv_heads, past_len, head_dim]
            self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
            self.kv_dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    @classmethod
    def load(cls, path: str, device: str = "cpu", n_threads: int | None = None) -> "OrtPolicy":
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("running .onnx models needs onnxruntime (pip install 'atod-edge[export]')") from None
        from atod_edge.models.loading import load_tokenizer_dir

        file = onnx_file(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(n_threads or os.cpu_count() or 1)
        # an unusable CUDA logs an error and falls back to CPU: we report get_providers() instead
        ort.set_default_logger_severity(4)
        try:
            session = ort.InferenceSession(str(file), sess_options=options, providers=providers_for(device))
        except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
            raise UserError(f"cannot load ONNX model {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        finally:
            ort.set_default_logger_severity(3)
        tokenizer = load_tokenizer_dir(file.parent, f"the tokenizer beside {file}")
        policy = cls(session, tokenizer, name=str(path), context_length=_config_context(file.parent))
        vocab = policy.logits_width()
        if vocab is not None and len(tokenizer) > vocab:
            raise UserError(f"{file}: the model's vocabulary ({vocab}) is smaller than the tokenizer beside "
                            f"it ({len(tokenizer)}): they do not belong together")
        return policy

    def logits_width(self) -> int | None:
        """The vocabulary size of the graph's logits output, where the graph fixes it."""
        for output in self.session.get_outputs():
            if output.name == "logits" and len(output.shape) == 3 and isinstance(output.shape[2], int):
                return output.shape[2]
        return None

    # -- one forward ---------------------------------------------------------------------------
    def _empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
                for _ in self.past_names]

    def _forward(self, input_ids, attention, positions, past):
        feeds = {"input_ids": input_ids, "attention_mask": attention}
        if "position_ids" in self.input_names:
            feeds["position_ids"] = positions
        feeds.update(zip(self.past_names, past))
        outputs = self.session.run(None, feeds)
        named = dict(zip(self.output_names, outputs))
        present = [named[n.replace("past_key_values", "present")] for n in self.past_names]
        return named["logits"], present

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """[T, V] float32 logits of one sequence (one forward, no cache): for parity checks."""
        ids = np.asarray([list(token_ids)], dtype=np.int64)
        attention = np.ones_like(ids)
        positions = np.arange(ids.shape[1], dtype=np.int64)[None]
        logits, _ = self._forward(ids, attention, positions, self._empty_past(1))
        return logits[0].astype(np.float32)

    # -- the decode loop -----------------------------------------------------------------------
    def generate(self, prompts, sampling: SamplingParams, seed: int | None = None) -> list[Generation]:
        import torch

        if not prompts:
            return []
        check_fits(prompts, sampling.max_new_tokens, self.context_length, "ONNX model")
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        checker = StopChecker(self.tokenizer, sampling)
        input_ids, attention, positions = left_pad(prompts, self.pad_id)

        outputs: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        live = list(range(len(prompts)))
        past = self._empty_past(len(prompts))
        step_input, step_positions = input_ids, positions
        while live:
            logits, past = self._forward(step_input, attention, step_positions, past)
            last = torch.from_numpy(np.ascontiguousarray(logits[:, -1, :], dtype=np.float32))
            ids, lps = sample_next(last, sampling.temperature, sampling.top_p, generator)
            ids_list, lps_list = ids.tolist(), lps.tolist()
            keep = []
            for row, orig in enumerate(live):
                outputs[orig].append(ids_list[row])
                logprobs[orig].append(lps_list[row])
                finish[orig] = checker.is_done(outputs[orig])
                if finish[orig] is None:
                    keep.append(row)
            next_ids = np.asarray(ids_list, dtype=np.int64)
            if len(keep) < len(live):
                live = [live[r] for r in keep]
                if not live:
                    break
                past = [p[keep] for p in past]
                attention, next_ids = attention[keep], next_ids[keep]
                step_positions = step_positions[keep]
            attention = np.concatenate([attention, np.ones((len(live), 1), dtype=np.int64)], axis=1)
            step_positions = step_positions[:, -1:] + 1
            step_input = next_ids[:, None]
        return [Generation(outputs[i], logprobs[i], checker.text(outputs[i]), finish[i] or "length")
                for i in range(len(prompts))]


def _config_context(directory: Path) -> int | None:
    """The context length in the config.json beside an exported .onnx file (None if unreadable)."""
    import json

    try:
        return model_context(json.loads((directory / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None
