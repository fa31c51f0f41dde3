"""Tests for atod_edge/kv_cache.py and TorchPolicy's reuse of prompt prefixes: whatever the
store holds, generation must equal a run that recomputes every prompt token."""

from __future__ import annotations

import pytest
import torch

from atod_edge.envs import make_env
from atod_edge.engine.sampling import SamplingParams
from atod_edge.engine.policy import TorchPolicy
from atod_edge.engine.kv_cache import PrefixStore, supports_prefix_cache
from atod_edge.prompts import build_messages, encode_prompt
from atod_edge.rollout.runner import run_episodes

GREEDY = SamplingParams(max_new_tokens=5, temperature=0.0, stop=())


@pytest.fixture(scope="module")
def turn_prompts(tiny_student):
    """Prompts of a household episode's first turns: they share the system text and the task."""
    _, tokenizer = tiny_student
    env = make_env("household")
    task_obs = obs = env.reset(env.tasks("eval", 1)[0])
    history, prompts = [], []
    for _ in range(3):
        prompts.append(encode_prompt(tokenizer, build_messages(env.instructions, task_obs, history,
                                                               obs if history else None,
                                                               env.admissible_actions())))
        action = env.admissible_actions()[0]
        obs = env.step(action).observation
        history.append((action, obs))
    return prompts


def _assert_same(cached, fresh):
    for a, b in zip(cached, fresh, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_reused_prefixes_give_the_same_generations(tiny_student, turn_prompts):
    model, tokenizer = tiny_student
    fresh = TorchPolicy(model, tokenizer, prefix_cache_mb=0)
    policy = TorchPolicy(model, tokenizer)
    with policy.reusing_prefixes():
        first = policy.generate(turn_prompts[:1], GREEDY)
        assert policy.last_store.hit_tokens == 0 and len(policy.last_store.blocks) > 0
        # Later turns: their prompts start with the first one's system text and task; a short
        # prompt and a duplicate ride in the same batch (uneven prefix hits, middle padding).
        later = turn_prompts[1:] + [turn_prompts[0][:20], turn_prompts[1]]
        cached = policy.generate(later, GREEDY)
        store = policy.last_store
    assert store.hit_tokens > 0.3 * store.prompt_tokens
    _assert_same(first, fresh.generate(turn_prompts[:1], GREEDY))
    _assert_same(cached, fresh.generate(later, GREEDY))
    assert policy._store is None            # the scope ended: nothing is reused outside it


def test_duplicate_prompts_are_computed_once_but_sampled_apart(student_policy, turn_prompts):
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, stop=())
    group = student_policy.generate([turn_prompts[0]] * 4, sampling, seed=5)
    assert len({tuple(g.token_ids) for g in group}) > 1      # each row draws its own tokens
    alone = student_policy.generate([turn_prompts[0]], GREEDY)[0]
    for row in student_policy.generate([turn_prompts[1], turn_prompts[0], turn_prompts[0]], GREEDY)[1:]:
        assert row.token_ids == alone.token_ids
        assert row.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_episodes_with_and_without_prefix_reuse_are_identical(tiny_student):
    model, tokenizer = tiny_student
    env = make_env("household")
    tasks = env.tasks("eval", 3)
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0)
    runs = {}
    for megabytes in (0, 64):
        policy = TorchPolicy(model, tokenizer, prefix_cache_mb=megabytes)
        runs[megabytes] = run_episodes(policy, "household", tasks, group_size=2, sampling=sampling,
                                       seed=9, max_turns=4)
    assert policy.last_store.hit_rate > 0.5
    for a, b in zip(runs[0], runs[64], strict=True):
        assert [t.response_ids for t in a.turns] == [t.response_ids for t in b.turns]
        for ta, tb in zip(a.turns, b.turns):
            assert ta.student_logprobs == pytest.approx(tb.student_logprobs, abs=1e-4)


def test_a_bucket_that_evicts_a_later_buckets_matched_blocks_loses_nothing(tiny_student, turn_prompts):
    """A store smaller than one prefill's prompts (a real model's KV in the default 256 MB:
    SmolLM2-135M holds ~5,600 tokens, 50 episodes' turn asks ~16,000): a prompt with a long new
    part is prefilled in its own bucket first, and the blocks it stores evict the blocks the
    second bucket's prompt matched when the hits were counted. Generations equal fresh ones."""
    model, tokenizer = tiny_student
    held = turn_prompts[2]
    other = list(reversed(turn_prompts[1]))        # shares no prefix: all of it is new
    blocks = len(PrefixStore().keys(held))
    policy = TorchPolicy(model, tokenizer, prefix_cache_tokens=blocks * 16)   # room for `held` only
    fresh = TorchPolicy(model, tokenizer, prefix_cache_mb=0)
    later = [other, held + turn_prompts[0][-3:]]
    with policy.reusing_prefixes():
        policy.generate([held], GREEDY)
        assert policy.last_store.match(PrefixStore().keys(held)) == blocks
        cached = policy.generate(later, GREEDY)
        store = policy.last_store
    assert store.hit_tokens >= blocks * 16 - 16                   # the second prompt reused `held`
    assert store.match(PrefixStore().keys(held)) < blocks          # and `other`'s blocks evicted it
    _assert_same(cached, fresh.generate(later, GREEDY))


def test_store_keys_match_only_whole_prefixes_and_evict_oldest():
    store = PrefixStore(block=4, max_bytes=3 * 4 * 8)          # three blocks of 8 float32
    assert len(store.keys(list(range(9)))) == 2               # the last token is always computed
    assert len(store.keys(list(range(8)))) == 1
    a, b = store.keys([1, 2, 3, 4, 5, 6, 7, 8, 9]), store.keys([1, 2, 3, 4, 0, 6, 7, 8, 9])
    assert a[0] == b[0] and a[1] != b[1]                      # block 2 differs by an earlier token
    for key in a:
        store.add(key, torch.ones(1, 2, 1, 4, 1))
    assert store.match(b) == 1 and store.match(a) == 2
    assert all(store.blocks[key].shape == (1, 2, 1, 4, 1) for key in a)
    store.add(b[1], torch.zeros(1, 2, 1, 4, 1))
    store.add(store.keys([5] * 9)[0], torch.zeros(1, 2, 1, 4, 1))
    assert store.bytes <= store.max_bytes and len(store.blocks) == 3
    assert store.match(a) == 0                                # a[0] was the least recently used


def test_sliding_window_models_are_not_cached(tiny_student):
    model, _ = tiny_student
    assert supports_prefix_cache(model.config)
    config = model.config.__class__.from_dict({**model.config.to_dict(), "layer_types": None})
    config.sliding_window, config.use_sliding_window = 64, True
    assert not supports_prefix_cache(config)


def test_buffer_cache_equals_concatenation_and_grows():
    from atod_edge.engine.kv_cache import buffer_cache

    cache = buffer_cache(num_layers=1, capacity=3)
    chunks = [torch.randn(2, 1, n, 4) for n in (2, 1, 4)]          # 7 positions: grows past 3
    for chunk in chunks:
        keys, values = cache.update(chunk, -chunk, 0)
    assert torch.equal(keys, torch.cat(chunks, dim=2)) and torch.equal(values, -keys)
    assert cache.get_seq_length() == 7
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(cache.layers[0].keys, torch.cat(chunks, dim=2)[1:])
    keys, _ = cache.update(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4), 0)
    assert keys.shape == (1, 1, 8, 4) and torch.equal(keys[:, :, :7], torch.cat(chunks, dim=2)[1:])


def test_buffer_cache_compacts_rows_in_place():
    from atod_edge.engine.kv_cache import buffer_cache

    cache = buffer_cache(num_layers=2, capacity=10)
    for layer in cache.layers:
        full = torch.randn(5, 2, 6, 3)
        layer.update(full, full + 1, None)
        layer.reference = full
    for keep in ([0, 2, 3], [1, 2], [1, 1, 0]):                      # ascending: in place; others
        cache.batch_select_indices(torch.tensor(keep))
        for layer in cache.layers:
            layer.reference = layer.reference[keep]
            assert torch.equal(layer.keys, layer.reference) and torch.equal(layer.values, layer.reference + 1)
    keys, _ = cache.layers[0].update(torch.zeros(3, 2, 1, 3), torch.zeros(3, 2, 1, 3))
    assert torch.equal(keys[:, :, :6], cache.layers[0].reference) and keys.shape == (3, 2, 7, 3)



def test_length_buckets_prefill_into_one_slab_and_decode_from_it(tiny_student, turn_prompts, monkeypatch):
    """Prompts whose new parts differ much in length are prefilled in separate forwards, each
    into its rows of one kv_slab (right-aligned to the widest bucket): the decode cache is that
    slab itself, and generations equal each prompt's alone."""
    import atod_edge.engine.kv_cache as kv_cache

    model, tokenizer = tiny_student
    slabs = []
    real = kv_cache.kv_slab
    monkeypatch.setattr(kv_cache, "kv_slab", lambda *a, **k: slabs.append(real(*a, **k)) or slabs[-1])
    import atod_edge.engine.policy as policy_module

    buckets = []
    monkeypatch.setattr(policy_module, "length_batches",
                        lambda lengths, _f=policy_module.length_batches: buckets.append(_f(lengths)) or buckets[-1])
    policy = TorchPolicy(model, tokenizer)
    fresh = TorchPolicy(model, tokenizer, prefix_cache_mb=0)
    prompts = [turn_prompts[2], turn_prompts[0][:9], list(reversed(turn_prompts[1]))[:30]]
    with policy.reusing_prefixes():
        policy.generate(turn_prompts[:1], GREEDY)
        slabs.clear(), buckets.clear()
        cached = policy.generate(prompts, GREEDY)
    assert len(buckets) == 1 and len(buckets[0]) >= 2 and len(slabs) == 1     # several buckets, one slab
    assert slabs[0].shape[2] == len(prompts)
    _assert_same(cached, [fresh.generate([p], GREEDY)[0] for p in prompts])


def test_a_buffer_refuses_keys_of_another_shape():
    from atod_edge.engine.kv_cache import buffer_cache

    slab = torch.zeros(1, 2, 2, 3, 8, 4)                           # [layers, 2, rows, kv_heads, capacity, dim]
    cache = buffer_cache(num_layers=1, capacity=8, prefix=(slab, 0))
    with pytest.raises(ValueError, match="do not fit a KV buffer"):
        cache.update(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4), 0)
    keys, _ = cache.update(torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4), 0)
    assert keys.data_ptr() == slab.data_ptr() and slab[0, 0, :, :, 0].eq(1).all()   # written in place


def test_a_model_whose_config_misstates_its_kv_shape_decodes_without_the_slab(tiny_student, turn_prompts):
    """kv_slab sizes the batch's KV buffer from the config; a model whose keys do not fit it (its
    config does not give its KV heads the usual way) falls back to transformers' cache without
    prefix reuse, with the same generations, instead of failing."""
    import copy

    model, tokenizer = tiny_student
    odd = copy.deepcopy(model)
    config = odd.config.get_text_config(decoder=True)
    config.head_dim = 2 * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    policy = TorchPolicy(odd, tokenizer)
    fresh = TorchPolicy(model, tokenizer, prefix_cache_mb=0)
    with policy.reusing_prefixes():
        first = policy.generate(turn_prompts[:1], GREEDY)
        later = policy.generate(turn_prompts[1:], GREEDY)
    assert not policy._full_attention and policy._store is None
    _assert_same(first + later, fresh.generate(turn_prompts[:1], GREEDY) + fresh.generate(turn_prompts[1:], GREEDY))
