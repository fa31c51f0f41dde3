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

On CPU the copy's linear layers are PackedLinear: the same nn.Linear, plus its weight reordered once
(at every refresh) into oneDNN's blocked layout, which the decode's skinny matmuls read faster than
the plain weight, with bit-identical results (tests/test_engine_speed.py): a SmolLM2-cut decode
step at batch 16 and two threads 18.8 vs 22.1 ms (benchmarks/bench_cpu_kernels.py). Wider inputs (prefill) take the plain weight,
where the blocked one is not faster.
"""

from __future__ import annotations

import copy

import torch


PACKED_MAX_ROWS = 64   # inputs of at most this many rows (decode) read the blocked weight


class PackedLinear(torch.nn.Linear):
    """An inference-only nn.Linear that also holds its weight in oneDNN's blocked layout for
    inputs of at most PACKED_MAX_ROWS rows (a decode step's batch); others, and inputs of another
    dtype, take F.linear with the plain weight. Its parameters are the nn.Linear's own (names,
    tying and state dict unchanged); `repack()` after they change."""

    packed: torch.Tensor | None = None

    @classmethod
    def convert(cls, module: torch.nn.Linear) -> bool:
        """Turn `module` into a PackedLinear in place; False (left as it is) where oneDNN cannot
        pack its weight here."""
        if module.weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        module.__class__ = cls
        try:
            module.repack()
        except (RuntimeError, AttributeError):   # no such op in this torch build, or the dtype is unsupported
            module.__class__ = torch.nn.Linear
            return False
        return True

    @torch.no_grad()
    def repack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.packed is not None and x.dtype == self.packed.dtype and x.numel() <= PACKED_MAX_ROWS * x.shape[-1]
                and not torch.is_grad_enabled()):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return torch.nn.functional.linear(x, self.weight, self.bias)


def rollout_copy(model, dtype: torch.dtype = torch.bfloat16):
    """A copy of `model` (eval mode, no gradients) whose floating-point parameters are in `dtype`.
    Buffers keep their dtype (rotary frequency tables stay fp32, as a checkpoint loaded in
    `dtype` has them); tied parameters stay tied. The fp32 parameters are never duplicated: each
    one is converted straight into the copy. On CPU its nn.Linear layers become PackedLinear."""
    memo = {}
    for parameter in model.parameters():
        if id(parameter) not in memo:
            data = parameter.detach().to(dtype) if parameter.is_floating_point() else parameter.detach().clone()
            memo[id(parameter)] = torch.nn.Parameter(data, requires_grad=False)
    duplicate = copy.deepcopy(model, memo)
    for module in duplicate.modules():
        if type(module) is torch.nn.Linear:
            PackedLinear.convert(module)
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
    for module in target.modules():
        if isinstance(module, PackedLinear):
            module.repack()
