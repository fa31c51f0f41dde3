"""The engine at real-model scale (issue 27): the folded GQA attention (no repeat_kv copy of the
cache under a padding mask) against transformers' stock SDPA path, on tiny Llama- and
Qwen3-shaped GQA models built here, in fp32 and bf16; and bf16 rollouts on CPU in the trainer
(config rollout_precision)."""

from __future__ import annotations


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from atod_edge.engine.attention import ATTENTION, ATTENTION_FP32, folded_attention, folded_sdpa_forward, \
    folded_sdpa_fp32_forward
from atod_edge.engine.policy import TorchPolicy
from atod_edge.engine.rollout_copy import rollout_copy
from atod_edge.engine.sampling import SamplingParams
from atod_edge.train.trainer import train

SAMPLE = SamplingParams(max_new_tokens=10, temperature=1.0, stop=())


def tiny_gqa(kind: str, tokenizer, seed: int = 0):
    """A 2-layer GQA model (8 query heads over 2 KV heads: 4 a group) of Llama's or Qwen3's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        attn_implementation="sdpa")
    torch.manual_seed(seed)
    return model_cls(config).eval()


def prompts_of(tokenizer):
    """Prompts of different lengths (left padding: a mask on every forward)."""
    texts = ["Go to the kitchen and open the fridge.", "Take the apple.", "Put the mug in the sink, then look.",
             "Look around the room and find the red key on the desk."]
    return [tokenizer(t)["input_ids"] for t in texts]


class RepeatKvCounter(TorchDispatchMode):
    """Counts the [B, heads, T, d] copies repeat_kv makes (its expand + reshape is an aten clone/_unsafe_view)."""

    def __init__(self):
        super().__init__()
        self.sdpa_key_heads: list[int] = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        if "scaled_dot_product" in str(func.overloadpacket.__name__):
            self.sdpa_key_heads.append(args[1].shape[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_folded_decode_matches_stock_sdpa(tiny_student, kind, dtype):
    _, tokenizer = tiny_student
    model = tiny_gqa(kind, tokenizer)
    if dtype == "bf16":
        model = rollout_copy(model)
    prompts = prompts_of(tokenizer)
    runs = {}
    for fold in (False, True):
        policy = TorchPolicy(model, tokenizer, precision=dtype)
        policy.fold_gqa = fold
        with policy.reusing_prefixes():
            runs[fold] = policy.generate(prompts[:2], SAMPLE, seed=5) + policy.generate(prompts, SAMPLE, seed=6)
    assert [g.token_ids for g in runs[True]] == [g.token_ids for g in runs[False]]
    tolerance = 1e-5 if dtype == "fp32" else 2e-2
    for a, b in zip(runs[True], runs[False]):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=tolerance, rtol=0)
    assert model.config._attn_implementation == "sdpa"          # restored after generate


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_forward_equals_repeat_kv(q_len, dtype):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module:
        num_key_value_groups = 3
        is_causal = True

    torch.manual_seed(0)
    batch, kv_heads, width, dim = 3, 2, 11, 8
    query = torch.randn(batch, q_len, kv_heads * 3, dim, dtype=dtype).transpose(1, 2)   # the models' layout
    key, value = (torch.randn(batch, kv_heads, width, dim, dtype=dtype) for _ in range(2))
    lengths = torch.tensor([11, 7, 9])
    keep = torch.arange(width)[None, :] >= (width - lengths)[:, None]                  # left padding
    causal = torch.arange(width)[None, :] <= torch.arange(width - q_len, width)[:, None]
    mask = (keep[:, None, None, :] & causal[None, None]) | (torch.arange(width) == torch.arange(
        width - q_len, width)[:, None])[None, None]
    for m in (mask, torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))):
        stock, _ = sdpa_attention_forward(Module(), query, key, value, m, scaling=dim ** -0.5)
        folded, _ = folded_sdpa_forward(Module(), query, key, value, m, scaling=dim ** -0.5)
        assert folded.shape == stock.shape == (batch, q_len, kv_heads * 3, dim)
        assert torch.allclose(folded.float(), stock.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_no_kv_copy_under_a_mask(tiny_student):
    """Stock SDPA expands keys to all 8 heads whenever rows are padded; the folded path hands SDPA
    the cache's own 2 KV heads."""
    _, tokenizer = tiny_student
    model = tiny_gqa("llama", tokenizer)
    heads = {}
    for fold in (False, True):
        policy = TorchPolicy(model, tokenizer)
        policy.fold_gqa = fold
        with RepeatKvCounter() as counter:
            policy.generate(prompts_of(tokenizer), SAMPLE, seed=1)
        heads[fold] = set(counter.sdpa_key_heads)
    assert heads == {False: {8}, True: {2}}


def test_folded_attention_leaves_other_implementations(tiny_student):
    _, tokenizer = tiny_student
    model = tiny_gqa("llama", tokenizer)
    model.config._attn_implementation = "eager"
    with folded_attention(model):
        assert model.config._attn_implementation == "eager"
    model.config._attn_implementation = "sdpa"
    with folded_attention(model):
        assert model.config._attn_implementation == ATTENTION
    with folded_attention(model, fp32_on_cpu=True):
        assert model.config._attn_implementation == ATTENTION_FP32
    assert model.config._attn_implementation == "sdpa"


def test_fp32_folded_attention_of_bf16_inputs_on_cpu():
    """The prefix tree's attention for a trainable model: bf16 query, keys and values attended in
    fp32 (the CPU's bf16 SDPA backward is slow), output and gradients back in bf16, equal to the
    folded attention of the same inputs in fp32."""

    class Module:
        num_key_value_groups = 3
        is_causal = True

    torch.manual_seed(0)
    query = torch.randn(2, 4, 6, 8).transpose(1, 2).bfloat16().requires_grad_()
    key, value = (torch.randn(2, 2, 9, 8).bfloat16().requires_grad_() for _ in range(2))
    mask = torch.ones(2, 1, 4, 9, dtype=torch.bool).tril(diagonal=5)
    out, _ = folded_sdpa_fp32_forward(Module(), query, key, value, mask, scaling=8 ** -0.5)
    want, _ = folded_sdpa_forward(Module(), query.float(), key.float(), value.float(), mask, scaling=8 ** -0.5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want.bfloat16())
    out.float().sum().backward()
    assert query.grad.dtype == key.grad.dtype == torch.bfloat16


# --- bf16 rollouts on CPU (config rollout_precision) ---------------------------------------------

def test_bf16_rollouts_of_an_fp32_run(small_teacher, monkeypatch, tmp_path):
    """rollout_precision=bf16 with precision=fp32: the rollouts decode a bf16 copy, lp_S is
    recomputed by the fp32 training forward (first ratio exactly 1), and after every update the
    copy holds the master's weights rounded to bf16."""
    from atod_edge.config import load_config
    from atod_edge.engine import policy as policy_module
    from atod_edge.engine import rollout_copy as rollout_copy_module
    from atod_edge.io import read_jsonl
    from atod_edge.train import trainer as trainer_module
    from atod_edge.train.config import TrainConfig

    decoded, recomputed, refreshed = [], [], []
    generate = policy_module.TorchPolicy.generate
    refresh = rollout_copy_module.refresh_rollout_copy
    recompute = trainer_module.recompute_old_logprobs

    def spy_generate(self, *args, **kwargs):
        decoded.append((next(self.model.parameters()).dtype, self.precision))
        return generate(self, *args, **kwargs)

    def spy_refresh(source, target):
        refresh(source, target)
        refreshed.append(all(torch.equal(target.get_parameter(name), p.detach().to(torch.bfloat16))
                             for name, p in source.named_parameters()))

    def spy_recompute(*args, **kwargs):
        recomputed.append((kwargs["precision"], next(args[0].parameters()).dtype))
        return recompute(*args, **kwargs)

    monkeypatch.setattr(policy_module.TorchPolicy, "generate", spy_generate)
    monkeypatch.setattr(rollout_copy_module, "refresh_rollout_copy", spy_refresh)
    monkeypatch.setattr(trainer_module, "recompute_old_logprobs", spy_recompute)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(TrainConfig, None, [
            "steps=2", "tasks_per_step=1", "group_size=2", "max_turns=2", "max_new_tokens=6", "lr=1e-3",
            "micro_batch=16", "eval_episodes=0", "sample_episodes=0", "checkpoint_every=2", "compare=false",
            "warmup_steps=0", "ppo_epochs=1", "algo=opd", "precision=fp32", "rollout_precision=bf16"])
        train(cfg, tmp_path / "run", "tiny-student", str(small_teacher), log=lambda *a: None)
    finally:
        torch.set_num_threads(before)
    assert decoded and set(decoded) == {(torch.bfloat16, "bf16")}
    assert recomputed == [("fp32", torch.float32)] * 2
    assert refreshed == [True, True]
    rows, _ = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    for row in rows:
        assert row["mean_ratio"] == 1.0 and row["clip_fraction"] == 0.0
        assert 0.0 < row["rollout_mismatch_mean"] < 1.0       # bf16 decode against the fp32 forward


def test_packed_rollout_copy_decodes_bit_identically(tiny_student, monkeypatch):
    """The rollout copy's linear layers read oneDNN-blocked weights at decode sizes: the same
    tokens and log-probs as the plain bf16 weights, the same parameter names and tying, and after
    a refresh the blocked weights follow the new masters."""
    from atod_edge.engine import rollout_copy as rollout_copy_module
    from atod_edge.engine.rollout_copy import PackedLinear, refresh_rollout_copy, rollout_copy

    model, tokenizer = tiny_student
    source = tiny_gqa("llama", tokenizer, seed=3)
    copy = rollout_copy(source)
    linears = [m for m in copy.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is PackedLinear and m.packed is not None for m in linears)
    assert [n for n, _ in copy.named_parameters()] == [n for n, _ in source.named_parameters()]
    assert copy.lm_head.weight is copy.model.embed_tokens.weight                         # still tied
    prompts = prompts_of(tokenizer)
    outputs = {}
    for rows in (rollout_copy_module.PACKED_MAX_ROWS, 0):   # 0: every input takes the plain weight
        monkeypatch.setattr(rollout_copy_module, "PACKED_MAX_ROWS", rows)
        generated = TorchPolicy(copy, tokenizer, precision="bf16").generate(prompts, SAMPLE, seed=5)
        outputs[rows] = [(g.token_ids, g.logprobs) for g in generated]
    assert outputs[rollout_copy_module.PACKED_MAX_ROWS] == outputs[0]
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(1.5)
    refresh_rollout_copy(source, copy)
    monkeypatch.setattr(rollout_copy_module, "PACKED_MAX_ROWS", 64)
    x = torch.randn(4, 1, 64).bfloat16()
    layer = copy.model.layers[0].mlp.up_proj
    with torch.inference_mode():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, source.model.layers[0].mlp.up_proj.weight.bfloat16()))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_the_rollout_copys_lean_decode_gives_the_models_own_logits(tiny_student, kind):
    """A Llama-family rollout copy decodes through LeanDecode (transformers' ops without its
    per-module plumbing, q/k/v and gate/up each one matmul): the same tokens and log-probs, bit for
    bit, as the model's own forward, with and without padding, and after a refresh its fused
    weights follow the new masters."""
    from atod_edge.engine.rollout_copy import refresh_rollout_copy, rollout_copy

    _, tokenizer = tiny_student
    source = tiny_gqa(kind, tokenizer, seed=4)
    copy = rollout_copy(source)
    lean = copy.atod_lean_decode
    calls = []
    real_call = type(lean).__call__

    def counted(self, *args):
        calls.append(1)
        return real_call(self, *args)

    padded, unpadded = prompts_of(tokenizer), [prompts_of(tokenizer)[0]] * 3
    for step in range(2):
        for prompts in (padded, unpadded):
            type(lean).__call__ = counted
            try:
                with_lean = TorchPolicy(copy, tokenizer, precision="bf16").generate(prompts, SAMPLE, seed=5)
            finally:
                type(lean).__call__ = real_call
            del copy.atod_lean_decode
            try:
                stock = TorchPolicy(copy, tokenizer, precision="bf16").generate(prompts, SAMPLE, seed=5)
            finally:
                copy.atod_lean_decode = lean
            assert [(g.token_ids, g.logprobs) for g in with_lean] == [(g.token_ids, g.logprobs) for g in stock]
        with torch.no_grad():
            for p in source.parameters():
                p.mul_(1.1)
        refresh_rollout_copy(source, copy)
    assert calls


def test_rollout_precision_resolution():
    from atod_edge.config import load_config
    from atod_edge.errors import ConfigError
    from atod_edge.train.config import TrainConfig
    from atod_edge.train.trainer import placement

    def where(*keys):
        return placement(load_config(TrainConfig, None, ["device=cpu", *keys]))

    assert not where().rollout_bf16 and not where().recompute                       # auto on CPU: fp32
    assert where("rollout_precision=bf16").rollout_bf16 and where("rollout_precision=bf16").recompute
    assert where("precision=bf16").rollout_bf16                                    # as before: bf16 runs
    assert not where("precision=bf16", "rollout_precision=fp32").rollout_bf16
    assert not where("precision=bf16", "recompute_old_logprobs=never").rollout_bf16
    with pytest.raises(ConfigError, match="rollout_precision"):
        load_config(TrainConfig, None, ["rollout_precision=bf16", "recompute_old_logprobs=never"])
