"""Tests for atod_edge/policy.py: TorchPolicy's batched KV-cache generation on tiny-student."""

from __future__ import annotations

import pytest
import torch

from atod_edge.envs import make_env
from atod_edge.errors import UserError
from atod_edge.engine.backends import load_policy
from atod_edge.engine.sampling import SamplingParams, StopChecker, sample_next
from atod_edge.engine.policy import TorchPolicy
from atod_edge.engine.batching import length_batches
from atod_edge.engine.precision import torch_device
from atod_edge.prompts import build_messages, encode_prompt, parse_action

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, stop=())


@pytest.fixture(scope="module")
def prompts(tiny_student):
    """Real household prompts cut to very different lengths (so the batch is heavily left-padded)."""
    _, tokenizer = tiny_student
    env = make_env("household")
    observation = env.reset(env.tasks("eval", 1)[0])
    full = encode_prompt(tokenizer, build_messages(env.instructions, observation, [], None,
                                                   env.admissible_actions()))
    assert len(full) > 100
    return [full[:100], full[:12], full[-40:], full[:3]]


@pytest.fixture(scope="module")
def greedy_batch(student_policy, prompts):
    return student_policy.generate(prompts, GREEDY)


@pytest.fixture(scope="module")
def greedy_alone(student_policy, prompts):
    return [student_policy.generate([prompt], GREEDY)[0] for prompt in prompts]


def full_forward_logprobs(model, prompt, response):
    """log-softmax of one unpadded forward over prompt + response, at the response tokens."""
    with torch.inference_mode():
        logits = model(torch.tensor([list(prompt) + list(response)])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return logp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def test_greedy_batch_equals_each_prompt_alone(prompts, greedy_batch, greedy_alone):
    assert len(length_batches([len(p) for p in prompts])) > 1    # prefilled apart, caches merged
    for together, alone in zip(greedy_batch, greedy_alone):
        assert together.token_ids == alone.token_ids
        assert together.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert together.text == alone.text and together.finish_reason == "length"
        assert len(together.token_ids) == GREEDY.max_new_tokens


def test_rows_leaving_the_batch_early_do_not_disturb_the_others(student_policy, prompts, greedy_batch,
                                                                greedy_alone):
    # Stop on the text of one row's first token: that row leaves after one step, the cache is
    # compacted and the remaining rows must still match their solo runs.
    decode = student_policy.tokenizer.decode
    firsts = [decode(g.token_ids[:1]).strip() for g in greedy_batch]
    leaver = next(i for i, text in enumerate(firsts) if text and i > 0 and
                  not any(text in g.text for j, g in enumerate(greedy_batch) if j != i))
    sampling = SamplingParams(max_new_tokens=GREEDY.max_new_tokens, temperature=0.0, stop=(firsts[leaver],))
    batch = student_policy.generate(prompts, sampling)
    assert [g.finish_reason for g in batch] == ["stop" if i == leaver else "length" for i in range(len(batch))]
    assert batch[leaver].token_ids == greedy_alone[leaver].token_ids[:1]
    for i, (together, alone) in enumerate(zip(batch, greedy_alone)):
        if i != leaver:
            assert together.token_ids == alone.token_ids
            assert together.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_recorded_logprobs_equal_a_full_forward(tiny_student, student_policy, prompts, greedy_batch):
    model, _ = tiny_student
    sampled = student_policy.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.9,
                                                              stop=()), seed=3)
    for prompt, greedy, sample in zip(prompts, greedy_batch, sampled):
        for gen in (greedy, sample):
            expected = full_forward_logprobs(model, prompt, gen.token_ids)
            assert torch.tensor(gen.logprobs) == pytest.approx(expected, abs=1e-4)


def test_same_seed_same_samples(student_policy, prompts):
    sampling = SamplingParams(max_new_tokens=4, temperature=1.0, stop=())
    first = student_policy.generate(prompts[1:], sampling, seed=11)
    again = student_policy.generate(prompts[1:], sampling, seed=11)
    other = student_policy.generate(prompts[1:], sampling, seed=12)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.logprobs for g in first] == [g.logprobs for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_stops_at_the_end_of_the_action(tiny_student, student_policy, prompts, forced_text):
    model, tokenizer = tiny_student
    forced = tokenizer("I will look. <action>look</action> and then more text",
                       add_special_tokens=False)["input_ids"]
    with forced_text(model, forced):
        gens = student_policy.generate(prompts[:2], SamplingParams(max_new_tokens=40))
    for gen in gens:
        assert gen.finish_reason == "stop"
        assert gen.text == "I will look. <action>look</action>"
        assert gen.token_ids == forced[:len(gen.token_ids)]
        assert parse_action(gen.text).action == "look"
        assert all(lp > -1e-3 for lp in gen.logprobs)   # the forced tokens are near-certain


def test_stops_on_end_of_turn_token(tiny_student, student_policy, prompts, forced_text):
    model, tokenizer = tiny_student
    eos = tokenizer.eos_token_id
    forced = tokenizer("hi", add_special_tokens=False)["input_ids"] + [eos]
    with forced_text(model, forced):
        gen = student_policy.generate(prompts[:1], SamplingParams(max_new_tokens=20))[0]
    assert gen.token_ids == forced and gen.finish_reason == "stop"
    assert gen.text == "hi"                      # the special token is not in the text


def test_stop_checker_on_real_tokens(tiny_student):
    _, tokenizer = tiny_student
    checker = StopChecker(tokenizer, SamplingParams(max_new_tokens=30))
    ids = tokenizer("go <action>open fridge 1</action>", add_special_tokens=False)["input_ids"]
    assert checker.is_done(ids) == "stop"
    assert all(checker.is_done(ids[:n]) is None for n in range(1, len(ids)))
    assert checker.is_done([tokenizer.eos_token_id]) == "stop"
    assert checker.is_done(tokenizer("x " * 40, add_special_tokens=False)["input_ids"][:30]) == "length"


def test_stop_checker_skipping_decodes_finishes_exactly_where_decoding_every_step_does(tiny_student):
    """The checker decodes a tail only after a token that may hold a stop string's last
    character; on random token streams (random vocabulary ids, and '</action>' spelt by random
    pieces of real text) it stops at the same token as a checker that decodes at every step."""
    import random

    _, tokenizer = tiny_student
    rng = random.Random(0)
    fast = StopChecker(tokenizer, SamplingParams(max_new_tokens=64))
    slow = StopChecker(tokenizer, SamplingParams(max_new_tokens=64))
    slow._may_end = None
    assert fast._may_end and len(fast._may_end) < len(tokenizer)   # some tokens are skipped
    pieces = ["</action>", "</", "action>", "<", "/", "act", "ion", ">", " >", "> x", "x</action", "a/>", "é>"]
    stops = 0
    for _ in range(200):
        text = "".join(rng.choice(pieces + ["word ", "go "]) for _ in range(12))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [rng.randrange(len(tokenizer)) if rng.random() < 0.2 else i for i in ids][:64]
        for n in range(1, len(ids) + 1):
            expected = slow.is_done(ids[:n])
            assert fast.is_done(ids[:n]) == expected, (ids[:n], tokenizer.decode(ids[:n]))
            if expected:
                stops += expected == "stop"
                break
    assert stops > 50


def test_sample_next_greedy_and_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    ids, logprobs = sample_next(logits, 0.0, 1.0, generator)
    assert ids.tolist() == [1, 0]
    assert logprobs == pytest.approx(torch.log_softmax(logits, -1)[[0, 1], [1, 0]])
    # top_p below the top token's probability keeps only that token, whatever the temperature
    for _ in range(20):
        ids, _ = sample_next(logits, 5.0, 0.3, generator)
        assert ids.tolist() == [1, 0]


def test_length_batches_are_the_cheapest_split():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 7))]
        cost = lambda batches: sum(len(b) * max(lengths[i] for i in b) + 128 for b in batches)  # noqa: E731
        batches = length_batches(lengths)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        splits = (list(c) for r in range(len(lengths)) for c in itertools.combinations(range(1, len(lengths)), r))
        cheapest = min(cost([order[a:b] for a, b in zip([0] + cut, cut + [len(lengths)])]) for cut in splits)
        assert cost(batches) == cheapest
    assert length_batches([50] * 6) == [list(range(6))]            # equal lengths: one batch


def test_sample_next_draws_from_the_tempered_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20_000, 1)
    generator = torch.Generator().manual_seed(1)
    for temperature in (1.0, 0.5):
        ids, logprobs = sample_next(logits, temperature, 1.0, generator)
        frequencies = torch.bincount(ids, minlength=4).float() / len(ids)
        assert frequencies == pytest.approx(torch.softmax(logits[0] / temperature, -1), abs=0.015)
        assert logprobs == pytest.approx(torch.log_softmax(logits[0], -1)[ids])   # temperature-1 log-probs
    # tokens of zero probability (cut by top_p, or underflowing) are never drawn
    ids, _ = sample_next(torch.tensor([[0.0, 0.0, -200.0, -200.0]]).repeat(20_000, 1), 0.2, 1.0, generator)
    assert set(ids.tolist()) == {0, 1}


def test_empty_inputs(student_policy):
    assert student_policy.generate([], GREEDY) == []
    with pytest.raises(UserError, match="empty prompt"):
        student_policy.generate([[1, 2], []], GREEDY)


def test_load_policy_loads_a_preset_as_a_torch_policy(atod_cache):
    policy = load_policy("tiny-student")
    assert isinstance(policy, TorchPolicy) and policy.name == "tiny-student"
    assert policy.tokenizer.chat_template


def test_device_names_are_checked_with_a_clear_message():
    assert torch_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        torch_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            torch_device("cuda")
    else:
        with pytest.raises(UserError, match="CUDA device"):
            torch_device(f"cuda:{torch.cuda.device_count()}")


def test_policy_module_imports_no_backend():
    """Imports run one way: the backends import policy.py (the interface); the dispatch that
    imports the backends lives above both, in atod_edge.backends, so policy.py names none."""
    import ast
    from pathlib import Path

    import atod_edge.engine.policy as policy_module

    tree = ast.parse(Path(policy_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not {m for m in imported if m.startswith("atod_edge.engine.backends")}
    assert not hasattr(policy_module, "load_policy")
