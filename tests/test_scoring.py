"""Tests for atod_edge/scoring.py: log-probs of recorded response tokens (teacher scoring)."""

from __future__ import annotations

import random

import pytest
import torch

from atod_edge.rollout.episode import Episode, Turn
from atod_edge.scoring.logprobs import response_logprobs, score_episodes, turn_pairs

# (prompt length, response length): very different lengths in one micro-batch, an empty response
SHAPES = [(3, 20), (150, 1), (40, 7), (90, 0), (12, 33)]


def token_pairs(vocab_size: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(p)] for p, _ in SHAPES]
    responses = [[rng.randrange(vocab_size) for _ in range(r)] for _, r in SHAPES]
    return prompts, responses


def direct(model, prompt, response):
    """Log-probs and entropies from one forward over the unpadded sequence alone."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1:len(prompt) + len(response) - 1], dim=-1)
    picked = logp.gather(-1, torch.tensor(response, dtype=torch.long).unsqueeze(-1)).squeeze(-1)
    return picked, -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_teacher_scoring_equals_a_direct_forward_of_each_sequence(tiny_teacher, prefix_reuse):
    model, tokenizer = tiny_teacher
    prompts, responses = token_pairs(model.config.vocab_size)
    episodes = [Episode(env="household", task_id="t0", seed=0, split="eval", turns=[
                    Turn("obs", prompt_ids=prompts[0], response_ids=responses[0]),
                    Turn("no tokens here"),                       # a turn without token fields
                    Turn("obs", prompt_ids=prompts[1], response_ids=responses[1])]),
                Episode(env="household", task_id="t1", seed=1, split="eval", turns=[
                    Turn("obs", prompt_ids=p, response_ids=r) for p, r in zip(prompts[2:], responses[2:])])]
    # micro_batch=2 puts a 3-token and a 150-token prompt in one right-padded batch
    score_episodes(model, episodes, pad_id=tokenizer.pad_token_id, micro_batch=2, prefix_reuse=prefix_reuse)
    scored = [episodes[0].turns[0], episodes[0].turns[2]] + episodes[1].turns
    assert episodes[0].turns[1].teacher_logprobs is None
    for turn, prompt, response in zip(scored, prompts, responses):
        assert len(turn.teacher_logprobs) == len(response)
        if response:
            expected, _ = direct(model, prompt, response)
            assert torch.tensor(turn.teacher_logprobs) == pytest.approx(expected, abs=1e-5)


def test_padding_id_does_not_change_the_scores(tiny_student):
    model, _ = tiny_student
    prompts, responses = token_pairs(model.config.vocab_size, seed=1)
    with torch.inference_mode():
        zero = response_logprobs(model, prompts, responses, pad_id=0)
        other = response_logprobs(model, prompts, responses, pad_id=17, micro_batch=3)
    for a, b in zip(zero, other):
        assert a.dtype == torch.float32 and a == pytest.approx(b, abs=1e-5)


def test_entropy_matches_the_full_vocabulary_entropy(tiny_student):
    model, _ = tiny_student
    prompts, responses = token_pairs(model.config.vocab_size, seed=2)
    with torch.inference_mode():
        logprobs, entropies = response_logprobs(model, prompts, responses, entropy=True)
    assert len(entropies) == len(prompts)
    for lp, ent, prompt, response in zip(logprobs, entropies, prompts, responses):
        assert lp.shape == ent.shape == (len(response),)
        if response:
            expected_lp, expected_ent = direct(model, prompt, response)
            assert lp == pytest.approx(expected_lp, abs=1e-5)
            assert ent == pytest.approx(expected_ent, abs=1e-4)
            assert bool((ent > 0).all()) and bool((ent <= torch.log(torch.tensor(4096.0)) + 1e-3).all())


def test_whole_model_forward_gives_the_same_logprobs(tiny_student):
    # the path a model sharded with FSDP takes: its own forward, logits only where needed
    model, _ = tiny_student
    prompts, responses = token_pairs(model.config.vocab_size, seed=4)
    with torch.inference_mode():
        split = response_logprobs(model, prompts, responses, micro_batch=3)
        whole = response_logprobs(model, prompts, responses, micro_batch=3, whole_model=True)
    for a, b in zip(split, whole):
        assert a.shape == b.shape and a == pytest.approx(b, abs=1e-5)


def test_gradients_flow_in_grad_mode(tiny_student):
    model, _ = tiny_student
    prompts, responses = token_pairs(model.config.vocab_size, seed=3)
    logprobs = response_logprobs(model, prompts[:2], responses[:2])
    total = sum(lp.sum() for lp in logprobs)
    assert total.requires_grad
    total.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    model.zero_grad(set_to_none=True)


def test_turn_pairs_lists_only_token_level_turns():
    episodes = [Episode("e", "a", 0, "eval", turns=[Turn("o", prompt_ids=[1], response_ids=[2]), Turn("o")]),
                Episode("e", "b", 0, "eval", turns=[Turn("o", prompt_ids=[3, 4], response_ids=[])])]
    assert turn_pairs(episodes) == ([[1], [3, 4]], [[2], []], [(0, 0), (1, 0)])
    score_episodes(None, [Episode("e", "c", 0, "eval", turns=[Turn("o")])])   # nothing to score: no forward


def test_a_bf16_teachers_linear_layers_change_no_score(small_teacher):
    """load_teacher under bf16 holds the teacher's linear layers in bf16 (not the LM head): the same
    log-probs, bit for bit, as autocast casting the fp32 weights at every call."""
    from atod_edge.models.loading import load_model
    from atod_edge.scoring.prefix_tree import shared_response_logprobs
    from atod_edge.scoring.teacher import load_teacher

    fp32, tokenizer = load_model(str(small_teacher))
    fp32.eval().requires_grad_(False)
    cast = load_teacher(str(small_teacher), "cpu", tokenizer, precision="bf16")
    linears = [m for m in cast.modules() if isinstance(m, torch.nn.Linear)]
    assert linears[-1] is cast.get_output_embeddings() and linears[-1].weight.dtype == torch.float32
    assert {m.weight.dtype for m in linears[:-1]} == {torch.bfloat16}
    assert load_teacher(str(small_teacher), "cpu", tokenizer, precision="fp32").model.layers[0].mlp.up_proj.weight.dtype \
        == torch.float32
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 200) for _ in range(20 + k)] for k in range(6)]
    responses = [[rng.randrange(3, 200) for _ in range(5)] for _ in range(6)]
    with torch.inference_mode():
        want = shared_response_logprobs(fp32, prompts, responses, precision="bf16")
        got = shared_response_logprobs(cast, prompts, responses, precision="bf16")
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_the_in_place_log_sum_exp_is_torchs_bit_for_bit():
    from atod_edge.scoring.tokens import log_sum_exp_

    logits = torch.randn(9, 3000, generator=torch.Generator().manual_seed(0)) * 7
    logits[1, :10] = float("-inf")
    logits[2] = float("-inf")                                       # a row with nothing possible
    logits[3, 5] = float("inf")
    expected = torch.logsumexp(logits, -1)
    work = logits.clone()
    got = log_sum_exp_(work)
    assert torch.equal(got, expected)
    assert not torch.equal(work, logits)                            # it worked in place
