"""The engine's attention: SDPA over grouped-query heads without copying keys and values.

transformers' SDPA path (integrations/sdpa_attention.py) expands the KV heads with `repeat_kv`
in every layer at every step whenever a mask is passed (SDPA's own `enable_gqa` is used only
without a mask), and a mask is passed whenever the rows of a batch have different prompt lengths:
the usual case in the rollout engine. That copy is the whole cache, groups times over, every step.

`folded_sdpa_forward` folds each KV group's query heads into the query axis instead:
query [B, kv_heads * groups, q, d] -> [B, kv_heads, groups * q, d] (the heads sharing KV head j
are j * groups ... j * groups + groups - 1, the order repeat_kv gives), so SDPA runs over the
cache's own [B, kv_heads, T, d] keys and values; a [B, 1, q, T] mask is broadcast over the folded
axis (a view for decode, where q = 1). Each query row meets the same keys, values and mask as
under repeat_kv, so outputs equal the stock path's to float rounding (tests/test_engine_speed.py).

It is registered with transformers under ATTENTION ("atod_folded_sdpa", with SDPA's mask
builder); the engine switches a model to it only for its own forwards (`folded_attention`). The
prefix-tree scorer (scoring/prefix_tree.py) uses it too, for a trainable model on CPU as
ATTENTION_FP32: the same attention computed in fp32 when the forward runs under bf16 autocast,
because the CPU's bf16 SDPA backward is slow (benchmarks/bench_cpu_kernels.py at the SmolLM2 cut's
tree shapes, query [16, 9, 47, 64] over 326 keys: forward + backward 33.6 ms stock bf16, 18.9 ms
folded bf16, 15.1 ms folded fp32). A trainable model takes it with and without gradients, so the recomputed old
log-probs and the update's forward stay the same computation (a first ratio of exactly 1).
"""

from __future__ import annotations

import contextlib

import torch

ATTENTION = "atod_folded_sdpa"
ATTENTION_FP32 = "atod_folded_sdpa_fp32"


def folded_sdpa_fp32_forward(module, query, key, value, attention_mask, **kwargs):
    """folded_sdpa_forward with bf16 query, keys and values computed in fp32 on CPU (its output
    cast back to the query's dtype); elsewhere the same as folded_sdpa_forward."""
    if query.device.type != "cpu" or query.dtype != torch.bfloat16:
        return folded_sdpa_forward(module, query, key, value, attention_mask, **kwargs)
    out, weights = folded_sdpa_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def folded_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-interface signature: returns ([B, q, heads, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1 or dropout or attention_mask.ndim != 4 or attention_mask.shape[1] != 1:
        # no mask: the stock path uses SDPA's enable_gqa (no copy); one KV head per query head: nothing to fold
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    attention_mask = attention_mask[:, :, :, :key.shape[-2]]
    folded = query.reshape(batch, kv_heads, groups * q_len, dim)
    if q_len > 1:       # [B, 1, q, T] -> [B, 1, groups * q, T]: query row g * q + i is position i
        attention_mask = attention_mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(
            batch, 1, groups * q_len, attention_mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask,
                                                           scale=scaling, is_causal=False)
    return out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


_REGISTERED = False


def register(fp32_on_cpu: bool = False) -> str:
    """Register the folded attentions (and SDPA's mask builder under their names) with
    transformers, once; returns the name of the one asked for."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION, folded_sdpa_forward)
        AttentionInterface.register(ATTENTION_FP32, folded_sdpa_fp32_forward)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        AttentionMaskInterface.register(ATTENTION_FP32, sdpa_mask)
        _REGISTERED = True
    return ATTENTION_FP32 if fp32_on_cpu else ATTENTION


def is_sdpa(config) -> bool:
    """Whether a model's attention is SDPA, stock or folded (the 4-D boolean mask applies)."""
    return getattr(config, "_attn_implementation", None) in ("sdpa", ATTENTION, ATTENTION_FP32)


@contextlib.contextmanager
def folded_attention(model, fp32_on_cpu: bool = False):
    """Run `model`'s SDPA attention as folded_sdpa_forward (fp32_on_cpu: folded_sdpa_fp32_forward)
    inside the scope (models whose config says "sdpa" only; others are left as they are),
    restoring it after."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    config._attn_implementation = register(fp32_on_cpu)
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
