"""Tests for train/loss.py: the clipped surrogate of ATOD.md section 5, with the OPD advantage
of section 2 plugged in."""

import torch

from atod_edge.train.advantages import combine, opd_advantages
from atod_edge.train.loss import clipped_surrogate, token_logprobs
from atod_edge.train.tdur import token_weights


def test_token_logprobs_matches_log_softmax_and_is_stable():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[0, 6, 3], [1, 1, 2]])
    expected = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, targets), expected)
    huge = torch.tensor([[1e4, 0.0, -1e4]])
    torch.testing.assert_close(token_logprobs(huge, torch.tensor([1])), torch.tensor([-1e4]))
    assert token_logprobs(logits.bfloat16(), targets).dtype == torch.float32


def _opd_step(token, student_logits, teacher_logits, lr=0.5):
    """One SGD step of the kappa=1, rho=0 surrogate on a single sampled token; returns lp before/after."""
    logits = student_logits.clone().requires_grad_(True)
    target = torch.tensor([token])
    old = token_logprobs(logits.detach(), target)
    teacher = token_logprobs(teacher_logits, target)
    adv = combine(opd_advantages(teacher, old), None, kappa=1.0, rho=0.0)
    loss, _ = clipped_surrogate(token_logprobs(logits, target), old, adv, torch.ones(1))
    loss.backward()
    with torch.no_grad():
        logits -= lr * logits.grad
    return float(old), float(token_logprobs(logits.detach(), target))


def test_opd_pushes_probability_toward_the_teacher():
    student_logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    teacher_logits = torch.tensor([[3.0, 0.0, 0.0, -3.0]])
    before, after = _opd_step(0, student_logits, teacher_logits)  # teacher likes token 0 more
    assert after > before
    before, after = _opd_step(3, student_logits, teacher_logits)  # teacher likes token 3 less
    assert after < before


def _kl_setup():
    gen = torch.Generator().manual_seed(1)
    positions, vocab = 6, 5
    student_logits = torch.randn(positions, vocab, generator=gen, dtype=torch.float64).requires_grad_(True)
    teacher_logits = torch.randn(positions, vocab, generator=gen, dtype=torch.float64)
    return student_logits, teacher_logits, gen


def test_opd_surrogate_gradient_equals_sampled_reverse_kl_gradient():
    """kappa=1, rho=0, uniform weights, one epoch (ratio = 1): the surrogate's gradient is the
    REINFORCE gradient of the sampled reverse KL, mean_t (lp_S - lp_T).detach() * grad log pi(a_t)."""
    student_logits, teacher_logits, gen = _kl_setup()
    samples = torch.multinomial(torch.softmax(student_logits.detach(), -1), 1, generator=gen).squeeze(-1)
    old = token_logprobs(student_logits.detach(), samples)
    teacher = token_logprobs(teacher_logits, samples)
    turn_index = torch.tensor([0, 0, 1, 1, 1, 2])
    weights = token_weights(old, teacher, turn_index, torch.tensor([0, 0, 1]), mode="uniform")
    adv = combine(opd_advantages(teacher, old, weights), None, kappa=1.0, rho=0.0)
    loss, stats = clipped_surrogate(token_logprobs(student_logits, samples), old, adv, torch.ones(6))
    (surrogate_grad,) = torch.autograd.grad(loss, student_logits)

    new = token_logprobs(student_logits, samples)
    reinforce = ((old - teacher).detach() * new).mean()
    (kl_grad,) = torch.autograd.grad(reinforce, student_logits)
    torch.testing.assert_close(surrogate_grad, kl_grad, atol=1e-6, rtol=0)
    assert stats["mean_ratio"] == 1.0 and stats["clip_fraction"] == 0.0


def test_opd_surrogate_in_expectation_is_the_exact_reverse_kl_gradient():
    """Weighting every possible token by pi(a) turns the sampled estimate into its expectation,
    which must equal grad KL(pi || pi_T) exactly (the +1 score term has zero mean)."""
    student_logits, teacher_logits, _ = _kl_setup()
    positions, vocab = student_logits.shape
    every_token = torch.arange(vocab).expand(positions, vocab)
    old = token_logprobs(student_logits.detach().unsqueeze(1).expand(-1, vocab, -1), every_token)
    teacher = token_logprobs(teacher_logits.unsqueeze(1).expand(-1, vocab, -1), every_token)
    new = token_logprobs(student_logits.unsqueeze(1).expand(-1, vocab, -1), every_token)
    adv = combine(opd_advantages(teacher, old), None, kappa=1.0, rho=0.0)
    loss, _ = clipped_surrogate(new, old, adv, mask=old.exp(), num_tokens=positions)
    (surrogate_grad,) = torch.autograd.grad(loss, student_logits)

    log_pi = torch.log_softmax(student_logits, -1)
    log_teacher = torch.log_softmax(teacher_logits, -1)
    exact_kl = (log_pi.exp() * (log_pi - log_teacher)).sum(-1).mean()
    (kl_grad,) = torch.autograd.grad(exact_kl, student_logits)
    torch.testing.assert_close(surrogate_grad, kl_grad, atol=1e-10, rtol=0)


def test_clipping_zeroes_gradient_only_on_the_clipped_side():
    eps = 0.2
    old = torch.zeros(4, dtype=torch.float64)
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +, -, -, +
    new = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([2.0, -2.0, -2.0, 2.0], dtype=torch.float64)
    loss, stats = clipped_surrogate(new, old, adv, torch.ones(4), eps_clip=eps)
    (grad,) = torch.autograd.grad(loss, new)
    assert grad[0] == 0 and grad[1] == 0  # clipped: the ratio already moved far enough that way
    # unclipped: d/dnew of -(ratio * A) / n = -ratio * A / n
    torch.testing.assert_close(grad[2:], torch.tensor([1.5 * 2 / 4, -0.5 * 2 / 4], dtype=torch.float64))
    assert stats["clip_fraction"] == 1.0
    assert stats["clip_active_fraction"] == 0.5
    # value: -(mean of [1.2*2, 0.8*-2, 1.5*-2, 0.5*2])
    torch.testing.assert_close(loss, torch.tensor(-(2.4 - 1.6 - 3.0 + 1.0) / 4, dtype=torch.float64))


def test_ratio_one_loss_is_minus_mean_advantage():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    loss, stats = clipped_surrogate(lp.clone().requires_grad_(True), lp, torch.tensor([1.0, -3.0, 0.5]), torch.ones(3))
    torch.testing.assert_close(loss, torch.tensor(0.5))
    assert stats["approx_kl"] == 0.0


def test_mask_excludes_non_response_tokens():
    old = torch.tensor([[-1.0, -2.0, -0.5, -4.0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    adv = torch.tensor([[100.0, 1.0, -1.0, -100.0]])
    new = (old + torch.tensor([[3.0, 0.1, -0.1, -3.0]])).requires_grad_(True)
    loss, stats = clipped_surrogate(new, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, new)
    assert grad[0, 0] == 0 and grad[0, 3] == 0
    assert grad[0, 1] != 0 and grad[0, 2] != 0
    expected = -(torch.exp(torch.tensor(0.1)) * 1.0 + torch.exp(torch.tensor(-0.1)) * -1.0) / 2
    torch.testing.assert_close(loss, expected)
    assert stats["clip_fraction"] == 0.0  # the masked tokens' wild ratios are not counted


def test_micro_batches_with_batch_token_count_match_one_batch():
    gen = torch.Generator().manual_seed(2)
    old = -torch.rand(2, 5, generator=gen, dtype=torch.float64)
    new = (old + 0.3 * torch.randn(2, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    full, _ = clipped_surrogate(new, old, adv, mask)
    (full_grad,) = torch.autograd.grad(full, new)
    total = mask.sum()
    parts = [clipped_surrogate(new[i], old[i], adv[i], mask[i], num_tokens=total)[0] for i in range(2)]
    (split_grad,) = torch.autograd.grad(parts[0] + parts[1], new)
    torch.testing.assert_close(split_grad, full_grad)
    torch.testing.assert_close(parts[0] + parts[1], full)
