"""Tests for atod_edge/shared_prefix.py: the prefix tree, and log-probs and gradients with every
shared prefix computed once equal to the per-turn forward (scoring.response_logprobs)."""

from __future__ import annotations

import pytest
import torch

from atod_edge.envs import env_class
from atod_edge.prompts import encode_prompt
from atod_edge.rollout.runner import episode_messages, run_scripted
from atod_edge.scoring.logprobs import response_logprobs
from atod_edge.scoring.prefix_tree import prefix_tree, shared_prefix_logprobs, shared_response_logprobs


def household_turns(tokenizer, tasks: int = 2, group: int = 2, max_turns: int = 5):
    """(prompts, responses) of real household turns: `group` noisy-expert episodes per task (other
    seeds, so they part ways), plus two edge cases: an empty response, and a turn whose prompt is
    another turn's prompt and response together (a sequence that is a prefix of another)."""
    env = env_class("household")
    prompts, responses = [], []
    for g in range(group):
        for ep in run_scripted("noisy", env, env().tasks("train", tasks), seed=g, noise=0.5):
            for k, turn in enumerate(ep.turns[:max_turns]):
                prompts.append(encode_prompt(tokenizer, episode_messages(ep, k, env.instructions)))
                responses.append(tokenizer(turn.response, add_special_tokens=False)["input_ids"])
    prompts.append(prompts[0])
    responses.append([])
    prompts.append(prompts[1] + responses[1][:2])
    responses.append(responses[1][2:] + responses[2])
    return prompts, responses


def test_the_tree_covers_every_position_once_and_shares_common_runs():
    shared = list(range(100, 120))
    sequences = [shared + [1, 2, 3], shared + [1, 2, 3, 4], shared + [5] + list(range(30, 50)), [7, 8], [],
                 shared[:3] + [9]]
    nodes, last = prefix_tree(sequences, min_shared=8)
    assert last[4] == -1
    for i, seq in enumerate(sequences[:4] + sequences[5:]):
        i = i if i < 4 else 5
        chain, node = [], last[i]
        while node >= 0:
            chain.append(nodes[node])
            node = nodes[node].parent
        chain.reverse()
        assert chain[0].start == 0 and chain[-1].end == len(seq)
        assert all(a.end == b.start for a, b in zip(chain, chain[1:]))   # no gap, no overlap
        assert all(list(sequences[n.owner][n.start:n.end]) == list(seq[n.start:n.end]) for n in chain)
    # the 20 shared tokens are one node under the first three; [.., 1, 2, 3] ends inside the fourth's chain
    root = nodes[last[2]].parent
    assert (nodes[root].start, nodes[root].end) == (0, 20)
    assert nodes[last[0]].end == 23 and nodes[last[1]].parent == last[0]
    # a 3-token common run with the sixth sequence is below min_shared: copied, not a node of its own
    assert nodes[last[5]].parent == -1 and nodes[last[5]].start == 0


def test_shared_prefix_logprobs_equal_the_per_turn_forward(tiny_teacher):
    model, tokenizer = tiny_teacher
    prompts, responses = household_turns(tokenizer)
    with torch.inference_mode():
        expected = response_logprobs(model, prompts, responses, pad_id=tokenizer.pad_token_id, micro_batch=8)
        got = shared_response_logprobs(model, prompts, responses, pad_id=tokenizer.pad_token_id, micro_batch=16)
    sequences = [p + r for p, r in zip(prompts, responses)][:16]
    nodes, _ = prefix_tree(sequences)
    assert sum(n.end - n.start for n in nodes) < 0.5 * sum(map(len, sequences))   # they did share prefixes
    for a, b, r in zip(expected, got, responses):
        assert b.shape == (len(r),) and b.dtype == torch.float32
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_scoring_from_the_second_token_matches_a_plain_forward(tiny_student):
    # the SFT prompt-loss case: every token after the first, shared ones included
    model, tokenizer = tiny_student
    prompts, responses = household_turns(tokenizer, tasks=1)
    sequences = [p + r for p, r in zip(prompts, responses)][:6]
    with torch.inference_mode():
        got = shared_prefix_logprobs(model, sequences, [1] * len(sequences))
        for seq, lp in zip(sequences, got):
            logits = model(torch.tensor([seq])).logits[0, :-1].float()
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
            torch.testing.assert_close(lp, expected, atol=1e-5, rtol=0)


def test_gradients_equal_the_per_turn_path(tiny_student):
    model, tokenizer = tiny_student
    prompts, responses = household_turns(tokenizer)
    weights = [torch.randn(len(r), generator=torch.Generator().manual_seed(i)) for i, r in enumerate(responses)]
    grads = []
    for score in (response_logprobs, shared_response_logprobs):
        model.zero_grad(set_to_none=True)
        lps = score(model, prompts, responses, pad_id=tokenizer.pad_token_id, micro_batch=len(prompts))
        sum((lp * w).sum() for lp, w in zip(lps, weights)).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    for name, expected in grads[0].items():
        assert float(expected.norm()) > 0, name
        assert float((grads[1][name] - expected).norm() / expected.norm()) < 1e-5, name


def test_score_from_zero_is_refused(tiny_student):
    model, _ = tiny_student
    with pytest.raises(ValueError, match="score_from must be >= 1"):
        shared_prefix_logprobs(model, [[1, 2, 3]], [0])


def test_the_direct_sdpa_mask_gives_what_the_models_own_mask_gives(tiny_teacher):
    # under SDPA each tree batch gets a 4-D mask built here; any other attention gets the 2-D mask
    # and builds its own: both must see the same keys (eager attention as the reference)
    model, tokenizer = tiny_teacher
    prompts, responses = household_turns(tokenizer)
    assert model.config._attn_implementation == "sdpa"
    with torch.inference_mode():
        direct = shared_response_logprobs(model, prompts, responses, pad_id=tokenizer.pad_token_id, micro_batch=16)
        model.set_attn_implementation("eager")
        try:
            own = shared_response_logprobs(model, prompts, responses, pad_id=tokenizer.pad_token_id, micro_batch=16)
        finally:
            model.set_attn_implementation("sdpa")
    for a, b in zip(own, direct):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_frozen_model_gathers_its_tree_cache_with_the_same_logprobs(tiny_teacher, monkeypatch, precision):
    """A frozen model (a teacher) takes the parent rows' keys and values straight into buffers with
    room for the new tokens (_gathered_cache); a trainable one keeps transformers' cache. Both give
    the same log-probs, bit for bit, in fp32 and under bf16 autocast."""
    import copy

    import atod_edge.scoring.prefix_tree as prefix_tree_module

    model, tokenizer = tiny_teacher
    frozen = copy.deepcopy(model).requires_grad_(False)
    trainable = copy.deepcopy(model).requires_grad_(True)
    prompts, responses = household_turns(tokenizer)
    gathered = []
    real = prefix_tree_module._gathered_cache
    monkeypatch.setattr(prefix_tree_module, "_gathered_cache", lambda *a: gathered.append(1) or real(*a))
    results = {}
    for name, m in (("trainable", trainable), ("frozen", frozen)):
        with torch.inference_mode():
            results[name] = shared_response_logprobs(m, prompts, responses, pad_id=tokenizer.pad_token_id,
                                                     micro_batch=16, precision=precision)
        assert bool(gathered) == (name == "frozen")
    for a, b in zip(results["trainable"], results["frozen"], strict=True):
        assert torch.equal(a, b)
