"""An importance matrix for llama.cpp's K-quants, from the agent's own episodes (`--calibrate`).

llama.cpp's quantizer weighs each weight column by how strongly it is used: the mean squared
activation entering every matrix multiplication, per input column (what its `llama-imatrix` tool
collects). llama-cpp-python 0.3.36 ships no such tool but exposes the quantizer's input,
`llama_model_quantize_params.imatrix`: a null-terminated array of `{name, data, size}` per GGUF
tensor. Here the statistics come from the PyTorch student itself, run over the tokens of its own
greedy episodes on the train split of its env (never the eval tasks that verification plays), so
the quantizer spends its precision where this agent's activations actually are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Calibration:
    imatrix: dict[str, np.ndarray]      # GGUF tensor name -> mean squared input activation per column
    episodes: int
    tokens: int
    env: str

    def summary(self) -> dict:
        return {"env": self.env, "split": "train", "episodes": self.episodes, "tokens": self.tokens,
                "tensors": len(self.imatrix)}


def episode_sequences(model, tokenizer, env: str, n_episodes: int, seed: int = 0) -> list[list[int]]:
    """Token ids (prompt + the student's reply) of every turn of its greedy train-split episodes."""
    from atod_edge.envs import env_class, env_tasks
    from atod_edge.engine.sampling import SamplingParams
    from atod_edge.engine.policy import TorchPolicy
    from atod_edge.rollout.runner import run_episodes

    env_cls = env_class(env)
    tasks = env_tasks(env_cls, "train", n_episodes)
    policy = TorchPolicy(model, tokenizer, name="calibration")
    episodes = run_episodes(policy, env_cls, tasks, sampling=SamplingParams(temperature=0.0), seed=seed)
    return [list(t.prompt_ids) + list(t.response_ids) for e in episodes for t in e.turns
            if t.prompt_ids and t.response_ids]


def collect_imatrix(model, sequences: list[list[int]]) -> dict[str, np.ndarray]:
    """Mean squared input activation per column of every linear layer, keyed by GGUF tensor name."""
    import gguf
    import torch

    from .gguf import ARCHS

    config = model.config
    arch_name, _ = ARCHS[config.model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str) -> Callable:
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, module.in_features).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    hooks = []
    for hf_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if hf_name == "lm_head":
            # with tied embeddings llama.cpp multiplies by token_embd for the output
            gguf_name = "token_embd.weight" if tied else "output.weight"
        else:
            gguf_name = names.get_name(f"{hf_name}.weight", try_suffixes=(".weight",))
        if gguf_name:
            hooks.append(module.register_forward_hook(hook_for(gguf_name)))
    try:
        with torch.inference_mode():
            for ids in sequences:
                model(input_ids=torch.tensor([ids], device=model.device))
    finally:
        for handle in hooks:
            handle.remove()
    return {name: (sums[name] / counts[name]).float().cpu().numpy() for name in sums}


def calibrate(model, tokenizer, env: str, n_episodes: int,
              progress: Callable[[str], None] | None = None) -> Calibration:
    say = progress or (lambda message: None)
    say(f"calibrating: the student's own greedy {env} train episodes ({n_episodes})")
    sequences = episode_sequences(model, tokenizer, env, n_episodes)
    if not sequences:
        from atod_edge.errors import UserError

        raise UserError(f"--calibrate: the student's {env} episodes produced no turns to calibrate on")
    imatrix = collect_imatrix(model, sequences)
    return Calibration(imatrix, n_episodes, sum(len(s) for s in sequences), env)


