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

A Llama-family copy also carries `atod_lean_decode` (LeanDecode), which TorchPolicy's decode steps
take instead of the model's forward: the same logits without transformers' per-module plumbing.

On CPU the copy's linear layers are PackedLinear: the same nn.Linear, plus its weight reordered once
(at every refresh) into oneDNN's blocked layout, which the decode's skinny matmuls read faster than
the plain weight, with bit-identical results (tests/test_engine_speed.py): a SmolLM2-cut decode
step at batch 16 and two threads 18.9 vs 23.3 ms (benchmarks/bench_cpu_kernels.py). Wider inputs (prefill) take the plain weight,
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


class LeanDecode:
    """A decode step of a Llama-family rollout copy (Llama, Qwen2, Qwen3: each layer's q/k/v,
    o, gate/up/down projections and RMSNorms as transformers builds them) without transformers'
    per-module plumbing, with q/k/v and gate/up each one matmul: per layer, a PackedLinear holding
    the concatenated weights. The same ops on the same values as the model's own forward, and the
    concatenated matmuls give bit-identical columns (oneDNN's blocked kernels, tested in fp32 and
    bf16): the same logits, bit for bit (tests/test_engine_speed.py). A SmolLM2-cut decode step at batch
    16, one process alternating: 17.7 -> 16.8 ms at two threads, 29.2 -> 27.8 ms at one.
    `refresh()` after the copy's weights change (refresh_rollout_copy calls it)."""

    def __init__(self, model):
        inner = model.model
        self.model, self.inner = model, inner
        self.qkv, self.gate_up = [], []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv.append(self._fused(attn.q_proj, attn.k_proj, attn.v_proj))
            self.gate_up.append(self._fused(mlp.gate_proj, mlp.up_proj))
        self.refresh()

    @staticmethod
    def supports(model) -> bool:
        """Llama-family layers, every projection a plain linear layer on the CPU."""
        inner = getattr(model, "model", None)
        if getattr(model.config, "model_type", None) not in ("llama", "qwen2", "qwen3") or inner is None:
            return False
        try:
            linears = [m for layer in inner.layers for m in (
                layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
            inner.rotary_emb, inner.embed_tokens, inner.norm, model.lm_head   # noqa: B018 - they must exist
        except AttributeError:
            return False
        return all(isinstance(m, torch.nn.Linear) and m.weight.device.type == "cpu" for m in linears)

    @staticmethod
    def _fused(*parts: torch.nn.Linear) -> "PackedLinear":
        first = parts[0]
        fused = torch.nn.Linear(first.in_features, sum(p.out_features for p in parts),
                                bias=first.bias is not None, dtype=first.weight.dtype)
        fused.requires_grad_(False)
        fused.parts = parts
        fused.sizes = [p.out_features for p in parts]   # its output's split into the parts' outputs
        PackedLinear.convert(fused)
        return fused

    @torch.no_grad()
    def refresh(self) -> None:
        for fused in self.qkv + self.gate_up:
            fused.weight.copy_(torch.cat([p.weight for p in fused.parts]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in fused.parts]))
            if isinstance(fused, PackedLinear):
                fused.repack()

    def __call__(self, input_ids, position_ids, cache, attention_mask):
        """The last position's logits [B, V] of one decode step (input_ids [B, 1]) on a buffer
        cache, with the model's current attention implementation."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        inner = self.inner
        attention = ALL_ATTENTION_FUNCTIONS[self.model.config._attn_implementation]
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden, position_ids)
        batch = input_ids.shape[0]
        for index, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(hidden)
            q, k, v = self.qkv[index](x).split(self.qkv[index].sizes, dim=-1)
            shape = (batch, 1, -1, attn.head_dim)
            q, k, v = q.view(shape), k.view(shape), v.view(shape)
            if hasattr(attn, "q_norm"):      # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            k, v = cache.layers[index].update(k, v.transpose(1, 2))
            out, _ = attention(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling)
            hidden = hidden + attn.o_proj(out.reshape(batch, 1, -1).contiguous())
            x = layer.post_attention_layernorm(hidden)
            gate, up = self.gate_up[index](x).split(self.gate_up[index].sizes, dim=-1)
            hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
        return self.model.lm_head(inner.norm(hidden))[:, -1, :]


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
    duplicate = duplicate.eval().requires_grad_(False)
    if LeanDecode.supports(duplicate):
        duplicate.atod_lean_decode = LeanDecode(duplicate)   # TorchPolicy's decode steps take it
    return duplicate


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
    lean = getattr(target, "atod_lean_decode", None)
    if lean is not None:
        lean.refresh()
