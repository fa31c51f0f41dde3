"""A low-precision copy of a model for rollouts (vLLM-style: the sampler runs bf16 weights while
the optimizer keeps fp32 masters).

The trainable student is held in fp32 (master weights, see atod_edge/train/precision.py) and
computes in bf16 autocast. Rolling out with that model costs fp32 weight reads every decode step
and, for Qwen3-style models (q/k norms in fp32, fp32 rotary tables), fp32 keys out of every
attention layer. A bf16 copy reads half the bytes and makes bf16 keys and values throughout;
it is refreshed from the masters after each update. Its log-probs differ from the training
forward's by bf16 rounding, which the trainer's recompute of the old log-probs with the update's
own forward absorbs (the ratio of the first epoch stays exactly 1).

    copy = rollout_copy(student)                 # once
    policy = TorchPolicy(copy, tokenizer, precision="bf16")
    ...update the student...
    refresh_rollout_copy(student, copy)          # after every optimizer step that rolls out next
"""

from __future__ import annotations

import copy

import torch


def rollout_copy(model, dtype: torch.dtype = torch.bfloat16):
    """A copy of `model` (eval mode, no gradients) whose floating-point parameters are in `dtype`.
    Buffers keep their dtype (rotary frequency tables stay fp32, as a checkpoint loaded in
    `dtype` has them); tied parameters stay tied. The fp32 parameters are never duplicated: each
    one is converted straight into the copy."""
    memo = {}
    for parameter in model.parameters():
        if id(parameter) not in memo:
            data = parameter.detach().to(dtype) if parameter.is_floating_point() else parameter.detach().clone()
            memo[id(parameter)] = torch.nn.Parameter(data, requires_grad=False)
    duplicate = copy.deepcopy(model, memo)
    return duplicate.eval().requires_grad_(False)


@torch.no_grad()
def refresh_rollout_copy(source, target) -> None:
    """Copy `source`'s parameters into `target` (a rollout_copy of it), converting to the
    target's dtype: the same values a fresh rollout_copy would hold. Parameters are matched by
    name; a mismatch (another architecture, a LoRA-wrapped source) raises."""
    sources = dict(source.named_parameters())
    targets = dict(target.named_parameters())
    if sources.keys() != targets.keys():
        missing = sorted(sources.keys() ^ targets.keys())[:3]
        raise ValueError(f"refresh_rollout_copy: parameter names differ ({', '.join(missing)} ...)")
    for name, parameter in sources.items():
        targets[name].copy_(parameter)      # rounds to the target's dtype, as .to(dtype) does
