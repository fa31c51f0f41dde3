"""Tests for the workstation-GPU path's engine and scoring fixes (issue 26, items 4-9), on CPU:
a tiny Qwen3-shaped model built here (q/k norms, GQA 4/2, tied embeddings, fp32 master weights)
computing in bf16 autocast, as the GPU recipes do (these CPUs have avx512_bf16)."""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from atod_edge.engine import kv_cache
from atod_edge.engine import policy as policy_module
from atod_edge.engine.kv_cache import PrefixStore, buffer_cache, store_budget_bytes, store_new_blocks
from atod_edge.engine.policy import TorchPolicy
from atod_edge.engine.rollout_copy import refresh_rollout_copy, rollout_copy
from atod_edge.engine.sampling import SamplingParams
from atod_edge.envs import make_env
from atod_edge.prompts import build_messages, encode_prompt
from atod_edge.rollout.episode import Episode, Turn
from atod_edge.scoring.logprobs import response_logprobs, score_episodes, token_batches
from atod_edge.scoring.prefix_tree import prefix_reuse_applies, shared_response_logprobs
from atod_edge.scoring.tokens import sampled_logprobs, tf32_matmuls, to_device

SAMPLE = SamplingParams(max_new_tokens=12, temperature=1.0, stop=())


def tiny_qwen3(tokenizer, seed: int = 0, layers: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def qwen3(tiny_student):
    """(fp32 tiny Qwen3, the tiny presets' tokenizer)."""
    _, tokenizer = tiny_student
    return tiny_qwen3(tokenizer), tokenizer


@pytest.fixture(scope="module")
def household_prompts(tiny_student):
    """First-turn prompts of four household tasks (different lengths: left padding)."""
    _, tokenizer = tiny_student
    env = make_env("household")
    prompts = []
    for task in env.tasks("eval", 4):
        observation = env.reset(task)
        prompts.append(encode_prompt(tokenizer, build_messages(env.instructions, observation, [], None,
                                                               env.admissible_actions())))
    return prompts


class FinishByFirstToken:
    """A stop checker under which rows finish at different steps (after 2 + first token % 9)."""

    def __init__(self, tokenizer, sampling):
        pass

    def is_done(self, output):
        return "stop" if len(output) >= 2 + output[0] % 9 else None

    def text(self, output):
        return ""


def generations(policy, prompts, seed=3, reuse=False):
    if not reuse:
        return policy.generate(prompts, SAMPLE, seed=seed)
    with policy.reusing_prefixes():
        return policy.generate(prompts[:2], SAMPLE, seed=seed) + policy.generate(prompts, SAMPLE, seed=seed + 1)


def assert_identical(a, b):
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]   # bit for bit


class OpCounter(TorchDispatchMode):
    """Counts aten ops and the largest tensor any of them returned."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}
        self.largest = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        self.ops[name] = self.ops.get(name, 0) + 1
        for tensor in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(tensor, torch.Tensor) and name not in ("slice", "select", "view", "transpose", "unsqueeze",
                                                                  "expand", "alias", "t", "detach", "as_strided"):
                self.largest = max(self.largest, tensor.numel())
        return out


# --- item 4: the KV cache in the compute dtype; no mask (no repeat_kv) when nothing is padded ---

def cache_dtypes(monkeypatch):
    """(keys' dtype, key buffer's, value buffer's) at every cache write of the engine's forwards."""
    seen = []
    original = kv_cache.BufferLayer.update

    def record(self, key_states, value_states, cache_kwargs=None):
        out = original(self, key_states, value_states, cache_kwargs)
        seen.append((key_states.dtype, self._k.dtype, self._v.dtype))
        return out

    monkeypatch.setattr(kv_cache.BufferLayer, "update", record)
    return seen


@pytest.mark.parametrize("precision, stored", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_kv_cache_is_kept_in_the_compute_dtype(qwen3, household_prompts, monkeypatch, precision, stored):
    model, tokenizer = qwen3
    seen = cache_dtypes(monkeypatch)
    TorchPolicy(model, tokenizer, precision=precision).generate(household_prompts, SAMPLE, seed=0)
    # Qwen3's k_norm (fp32 weight) and fp32 rotary tables make the keys fp32 under autocast
    assert seen and seen[0][0] == torch.float32
    assert {(k, v) for _, k, v in seen} == {(stored, stored)}


@pytest.mark.parametrize("reuse", [False, True])
def test_a_bf16_cache_gives_the_generations_of_an_fp32_one(qwen3, household_prompts, monkeypatch, reuse):
    """SDPA casts the keys to bf16 under autocast anyway: storing them so changes nothing."""
    model, tokenizer = qwen3
    policy = TorchPolicy(model, tokenizer, precision="bf16")
    monkeypatch.setattr(policy_module, "StopChecker", FinishByFirstToken)
    bf16 = generations(policy, household_prompts, reuse=reuse)
    monkeypatch.setattr(kv_cache, "cache_dtype", lambda key_states: key_states.dtype)   # the old cache
    assert_identical(bf16, generations(TorchPolicy(model, tokenizer, precision="bf16"), household_prompts,
                                       reuse=reuse))


def count_repeat_kv(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    calls = []
    original = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda states, n: calls.append(states.shape[2]) or original(states, n))
    return calls


def test_decoding_unpadded_rows_passes_no_mask_and_repeats_no_kv(qwen3, household_prompts, monkeypatch):
    model, tokenizer = qwen3
    layers = model.config.num_hidden_layers
    calls = count_repeat_kv(monkeypatch)
    same = [household_prompts[0]] * 3                 # a group's first turn: nothing is padded
    stock = TorchPolicy(model, tokenizer, precision="bf16")
    stock.fold_gqa = False                            # transformers' own SDPA path
    stock.generate(same, SAMPLE, seed=0)
    assert len(calls) == 2 * layers                   # the prefill's keys and values only
    calls.clear()
    stock.generate(household_prompts, SAMPLE, seed=0)
    assert len(calls) == 2 * layers * SAMPLE.max_new_tokens   # padded rows still need the mask
    calls.clear()
    for prompts in (same, household_prompts):         # the engine's folded GQA attention: never (issue 27)
        TorchPolicy(model, tokenizer, precision="bf16").generate(prompts, SAMPLE, seed=0)
    assert calls == []


def test_decoding_without_the_mask_gives_the_same_generations(qwen3, household_prompts, monkeypatch):
    model, tokenizer = qwen3
    same = [household_prompts[1]] * 4
    monkeypatch.setattr(policy_module, "StopChecker", FinishByFirstToken)
    without = TorchPolicy(model, tokenizer, precision="bf16").generate(same, SAMPLE, seed=2)

    reference = TorchPolicy(model, tokenizer, precision="bf16")
    forward = model.forward

    def with_mask(**kwargs):   # the engine before: an all-true mask in every decode step
        if kwargs.get("attention_mask") is None and kwargs["input_ids"].shape[1] == 1:
            rows, past = kwargs["input_ids"].shape[0], kwargs["past_key_values"].get_seq_length()
            kwargs["attention_mask"] = reference._mask(torch.ones(rows, past + 1, dtype=torch.long), 1)
        return forward(**kwargs)

    reference.model = ModelCall(with_mask, model)
    assert_identical(without, reference.generate(same, SAMPLE, seed=2))


class ModelCall:
    """Stands in for a model: calls `function` with the forward's arguments."""

    def __init__(self, function, model):
        self.function, self.config, self.dtype = function, model.config, model.dtype

    def __call__(self, **kwargs):
        return self.function(**kwargs)


# --- item 4: a bf16 rollout copy of the fp32 student, refreshed after each update -----------------

def test_the_rollout_copy_is_bf16_tied_and_refreshed_exactly(qwen3):
    model, _ = qwen3
    student = tiny_qwen3(qwen3[1], seed=1)
    copy = rollout_copy(student)
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert copy.model.rotary_emb.inv_freq.dtype == torch.float32          # buffers keep theirs
    assert copy.lm_head.weight is copy.model.embed_tokens.weight          # still tied
    assert not any(p.requires_grad for p in copy.parameters()) and not copy.training
    with torch.no_grad():                                                 # an update
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    refresh_rollout_copy(student, copy)
    fresh = rollout_copy(student)
    for a, b in zip(copy.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError):
        refresh_rollout_copy(tiny_qwen3(qwen3[1], layers=3), copy)


def test_rolling_out_with_the_copy_keeps_a_bf16_cache_and_the_students_distribution(qwen3, household_prompts,
                                                                                    monkeypatch):
    model, tokenizer = qwen3
    seen = cache_dtypes(monkeypatch)
    copy = rollout_copy(model)
    generated = TorchPolicy(copy, tokenizer, precision="bf16").generate(household_prompts, SAMPLE, seed=0)
    assert {d for row in seen for d in row} == {torch.bfloat16}
    prompts = household_prompts
    responses = [g.token_ids for g in generated]
    with torch.no_grad():   # the master weights' training forward on the copy's tokens
        master = torch.cat(response_logprobs(model, prompts, responses, precision="bf16"))
    rollout = torch.tensor([lp for g in generated for lp in g.logprobs])
    assert (master - rollout).abs().max() < 0.05     # bf16 rounding, which the recompute absorbs


# --- item 5: compaction without a host sync or a per-row copy ---------------------------------------

def old_batch_select_indices(self, indices):
    """BufferLayer.batch_select_indices before issue 26 (a tolist() and a copy_ per moved row)."""
    if not self.is_initialized:
        return
    keep = indices.tolist()
    if all(a < b for a, b in zip(keep, keep[1:])):
        for buffer in (self._k, self._v):
            for row, source in enumerate(keep):
                if source != row:
                    buffer[row, :, :self.length].copy_(buffer[source, :, :self.length])
        self._k, self._v = self._k[:len(keep)], self._v[:len(keep)]
    else:
        self._k, self._v = self._k[indices], self._v[indices]
    self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]


def test_compaction_is_one_gather_and_one_write_per_buffer():
    cache = buffer_cache(num_layers=3, capacity=20)
    for layer in cache.layers:
        layer.update(torch.randn(8, 2, 6, 4), torch.randn(8, 2, 6, 4))
    reference = [(layer.keys[[1, 3, 5, 7]].clone(), layer.values[[1, 3, 5, 7]].clone()) for layer in cache.layers]
    with OpCounter() as counter:
        cache.batch_select_indices(torch.tensor([1, 3, 5, 7]))
    assert counter.ops.get("index_select") == 2 * 3 and counter.ops.get("copy_") == 2 * 3
    assert "_local_scalar_dense" not in counter.ops and "item" not in counter.ops
    for layer, (k, v) in zip(cache.layers, reference):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v) and layer._k.shape[0] == 4


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("reuse", [False, True])
def test_compaction_gives_the_generations_of_the_per_row_copies(qwen3, household_prompts, monkeypatch, precision,
                                                                 reuse):
    model, tokenizer = qwen3
    monkeypatch.setattr(policy_module, "StopChecker", FinishByFirstToken)
    prompts = household_prompts + [household_prompts[0]] * 2
    new = generations(TorchPolicy(model, tokenizer, precision=precision), prompts, seed=5, reuse=reuse)
    lengths = {len(g.token_ids) for g in new}
    assert len(lengths) > 2                           # rows finished at different steps
    monkeypatch.setattr(kv_cache.BufferLayer, "batch_select_indices", old_batch_select_indices)
    assert_identical(new, generations(TorchPolicy(model, tokenizer, precision=precision), prompts, seed=5,
                                      reuse=reuse))


# --- item 6: the LM head's precision ------------------------------------------------------------------

def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 (10 bits of mantissa, round to nearest): what a TF32 matmul reads."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def test_tf32_is_enabled_for_the_head_on_cuda_only_and_restored():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with tf32_matmuls(torch.device("cpu")):
        assert matmul.fp32_precision == before
    with tf32_matmuls(torch.device("cuda")):          # no CUDA needed to construct the device
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before


def test_tf32_and_bf16_heads_against_the_fp32_head(qwen3, household_prompts):
    """Measured on the tiny Qwen3's bf16-autocast hidden states at its own samples: the largest
    |log-prob error| of a TF32 head (emulated by rounding its inputs) and of a bf16 head (bf16
    logits, log-softmax in fp32) against the fp32 head."""
    model, tokenizer = qwen3
    generated = TorchPolicy(model, tokenizer, precision="bf16").generate(household_prompts, SAMPLE, seed=0)
    features, targets = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for prompt, g in zip(household_prompts, generated):
            hidden = model.model(input_ids=torch.tensor([prompt + g.token_ids])).last_hidden_state[0]
            features.append(hidden[len(prompt) - 1:-1].float())
            targets.append(torch.tensor(g.token_ids))
    features, targets = torch.cat(features), torch.cat(targets)
    weight = model.lm_head.weight.detach()
    with torch.no_grad():
        fp32 = sampled_logprobs(features, targets, head=model.lm_head)
        reference = torch.log_softmax(features.double() @ weight.double().T, -1).gather(-1, targets[:, None])[:, 0]
        tf32 = torch.log_softmax(round_to_tf32(features) @ round_to_tf32(weight).T, -1).gather(-1, targets[:, None])
        bf16 = torch.log_softmax((features.bfloat16() @ weight.bfloat16().T).float(), -1).gather(-1, targets[:, None])
    assert (fp32.double() - reference).abs().max() < 1e-5
    assert (tf32[:, 0].double() - reference).abs().max() < 2e-3
    assert (bf16[:, 0].double() - reference).abs().max() < 0.1


# --- item 7: no-grad scoring batched by tokens, copies from pinned memory -----------------------------

def test_token_batches_respect_the_budget():
    lengths = [50, 10, 300, 20, 20, 60, 10]
    groups = token_batches(lengths, 100)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= 100
    assert [2] in groups                              # longer than the budget: alone


def episodes_of(prompts, responses):
    return [Episode(env="household", task_id=str(i), seed=i, split="train",
                    turns=[Turn(observation="", prompt_ids=p, response_ids=r)])
            for i, (p, r) in enumerate(zip(prompts, responses))]


@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_scoring_by_token_budget_gives_the_same_scores_in_fewer_forwards(tiny_teacher, household_prompts,
                                                                         monkeypatch, prefix_reuse):
    model, _ = tiny_teacher
    prompts = [household_prompts[i % 4][:60 + 7 * i] for i in range(12)]
    responses = [[5 + i] * (3 + i % 5) for i in range(12)]
    calls = []
    forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    by_turns, by_tokens = episodes_of(prompts, responses), episodes_of(prompts, responses)
    score_episodes(model, by_turns, micro_batch=2, prefix_reuse=prefix_reuse)
    turn_forwards, calls[:] = len(calls), []
    score_episodes(model, by_tokens, micro_batch=2, prefix_reuse=prefix_reuse, token_budget=4096)
    assert len(calls) < turn_forwards
    for a, b in zip(by_turns, by_tokens):
        assert b.turns[0].teacher_logprobs == pytest.approx(a.turns[0].teacher_logprobs, abs=1e-5)


def test_host_tensors_go_to_cuda_from_pinned_memory_without_blocking():
    class Host:
        def __init__(self):
            self.calls = []

        def pin_memory(self):
            self.calls.append("pin")
            return self

        def to(self, device, non_blocking=False):
            self.calls.append(("to", str(device), non_blocking))
            return self

    cuda, cpu = Host(), Host()
    to_device(cuda, torch.device("cuda"))
    to_device(cpu, torch.device("cpu"))
    assert cuda.calls == ["pin", ("to", "cuda", True)] and cpu.calls == [("to", "cpu", False)]


# --- item 8: the prefix store sized in tokens or from free memory; only new blocks are copied --------

def test_the_prefix_store_is_sized_in_tokens():
    store = PrefixStore(block=4, max_tokens=12)       # three blocks, whatever a block weighs
    for n in range(5):
        store.add(bytes([n]), torch.zeros(2, 2, 3, 4, 8, dtype=torch.bfloat16))
    assert len(store.blocks) == 3 and store.max_bytes == 3 * 2 * 2 * 3 * 4 * 8 * 2


def test_the_prefix_store_takes_a_share_of_free_cuda_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 << 30, 80 << 30))
    on_cuda = types.SimpleNamespace(device=torch.device("cuda"))
    assert store_budget_bytes(on_cuda) == int((40 << 30) * kv_cache.FREE_MEMORY_SHARE)
    assert store_budget_bytes(torch.zeros(1)) == kv_cache.CPU_STORE_BYTES
    assert PrefixStore().max_bytes is None            # decided when the first block arrives


def test_storing_new_blocks_copies_only_those_blocks():
    block, layers, heads, dim = 4, 3, 2, 5
    cache = buffer_cache(num_layers=layers, capacity=40)
    width = 30
    for layer in cache.layers:
        keys = torch.randn(3, heads, width, dim)
        layer.update(keys, -keys)
    # row 0: 2 reused blocks, suffix 14 (2 new blocks); row 1: no new block; row 2: suffix 30 (7 new)
    block_keys = [[b"a%d" % i for i in range(4)], [b"b0"], [b"c%d" % i for i in range(7)]]
    hits, suffixes = [2, 1, 0], [14, 3, 30]
    store = PrefixStore(block=block, max_bytes=1 << 30)
    with OpCounter() as counter:
        store_new_blocks(store, cache, block_keys, hits, suffixes)
    new_blocks, block_numel = 2 + 7, layers * 2 * heads * block * dim
    assert counter.largest <= new_blocks * block_numel   # the old code stacked [layers, 2, 3 rows, heads, 30, dim]
    assert len(store.blocks) == new_blocks
    for row, n, s in ((0, 2, 14), (2, 0, 30)):
        for b in range(n, len(block_keys[row])):
            at = width - s + (b - n) * block
            expected = torch.stack([torch.stack((layer.keys[row, :, at:at + block], layer.values[row, :, at:at + block]))
                                    for layer in cache.layers])
            assert torch.equal(store.blocks[block_keys[row][b]], expected)


# --- item 9: old log-probs and the update take the same path: the first ratio is exactly 1 ------------

def update_path_logprobs(model, prompts, responses, training: bool):
    """What the trainer runs: the old log-probs in eval mode without grad, the update in train
    mode with grad, each on the path prefix_reuse_applies picks for the model at that moment."""
    model.train(training)
    reuse = prefix_reuse_applies(model)
    with torch.enable_grad() if training else torch.no_grad():
        if reuse:
            lp = shared_response_logprobs(model, prompts, responses, micro_batch=len(prompts), precision="bf16")
        else:
            lp = response_logprobs(model, prompts, responses, micro_batch=len(prompts), precision="bf16")
    model.eval()
    return torch.cat(lp).detach()


@pytest.mark.parametrize("checkpointing", [True, False])
def test_old_logprobs_equal_the_updates_under_bf16(qwen3, household_prompts, checkpointing):
    model = tiny_qwen3(qwen3[1], seed=2)
    if checkpointing:
        model.gradient_checkpointing_enable()
    prompts = [household_prompts[0][:80 + 9 * i] for i in range(6)]     # one task: shared prefixes
    responses = [[7 + i] * (4 + 3 * i) for i in range(6)]
    old = update_path_logprobs(model, prompts, responses, training=False)
    new = update_path_logprobs(model, prompts, responses, training=True)
    assert torch.equal(torch.exp(new - old), torch.ones_like(old))         # ratio == 1 exactly
