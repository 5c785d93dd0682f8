"""`vocab_parallel_token_loss`: the loss's gradient taken in the forward, chunk by chunk.

Against the same fp64 full-vocabulary oracle as `vocab_parallel_token_stats` (the cases it
is checked on, from `tests/helpers.py`; TP = 1, 2 and 4 on gloo ranks, both ∂W accumulations), and
against the two-pass path with a nonlinear loss; plus its collectives, the chunks it hands
the loss, and its errors.
"""

from __future__ import annotations

import pytest
import torch

from sdpg_megatron.parallel import vocab_parallel_token_loss, vocab_parallel_token_stats
from tests.helpers import CASES, TP_SIZES, assert_matches_reference, results_at_tp, single_pass_stats


@pytest.fixture(scope="module", params=[(tp, fp32) for tp in TP_SIZES for fp32 in (False, True)],
                ids=lambda p: f"tp{p[0]}-{'fp32' if p[1] else 'weight_dtype'}_grad_weight")
def single_pass_results(request):
    tp, fp32 = request.param
    return tp, results_at_tp(single_pass_stats, tp, "torch", fp32)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_naive_fp64_reference(single_pass_results, case):
    tp, per_rank = single_pass_results
    assert_matches_reference(tp, per_rank, case)
    for results in per_rank:
        assert results[case.name]["loss_error"] < 1e-5


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_chunks_and_collectives(single_pass_results, case):
    """The loss sees every token once, chunk by chunk in order; at TP > 1 each chunk costs
    the two statistics collectives and the forward ends with ∂h's; backward has none."""
    tp, per_rank = single_pass_results
    size = min(case.chunk_size, case.num_tokens)
    expected_chunks = [(start, min(start + size, case.num_tokens)) for start in range(0, case.num_tokens, size)]
    views, stats = (2, 5) if case.teacher else (1, 3)
    expected_calls = [] if tp == 1 else [
        numel for start, stop in expected_chunks for numel in (views * (stop - start), stats * (stop - start))
    ] + [case.num_tokens * case.hidden]
    for results in per_rank:
        assert results[case.name]["chunks"] == expected_chunks
        assert [numel for _, numel in results[case.name]["forward_calls"]] == expected_calls
        assert results[case.name]["backward_calls"] == []


def _nonlinear_loss_inputs(seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(29, 12, generator=generator)
    weight = torch.randn(96, 12, generator=generator) * 0.5
    teacher = hidden + 0.3 * torch.randn(29, 12, generator=generator)
    targets = torch.randint(0, 90, (29,), generator=generator)
    upstream = torch.randn(3, 29, generator=generator)
    return hidden, weight, teacher, targets, upstream


def test_nonlinear_loss_matches_the_two_pass_path():
    """A loss that is not linear in the statistics (a clipped ratio, a squared KL): the
    chunk-wise gradients are those of autograd through `vocab_parallel_token_stats`."""
    hidden, weight, teacher, targets, upstream = _nonlinear_loss_inputs()

    def per_token(logprobs, entropy, reverse_kl, rows):
        ratio = torch.exp(logprobs - upstream[0, rows].clamp(-8, -2)).clamp(0.8, 1.2)
        return -ratio * upstream[1, rows] + 0.3 * reverse_kl.square() + 0.01 * entropy

    results = []
    for single_pass in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if single_pass:
            loss, _ = vocab_parallel_token_loss(
                h, w, targets, teacher, vocab_size=90, temperature=0.8, chunk_size=4,
                token_loss=lambda st, rows: per_token(st.logprobs, st.entropy, st.reverse_kl, rows).sum())
        else:
            st = vocab_parallel_token_stats(h, w, targets, teacher, vocab_size=90, temperature=0.8, chunk_size=4)
            loss = per_token(st.logprobs, st.entropy, st.reverse_kl, slice(None)).sum()
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    (loss_a, dh_a, dw_a), (loss_b, dh_b, dw_b) = results
    assert loss_b == pytest.approx(loss_a.item(), rel=1e-6)
    assert (dh_b - dh_a).norm() <= 1e-5 * dh_a.norm()
    assert (dw_b - dw_a).norm() <= 1e-5 * dw_a.norm()
    assert dw_a.norm() > 0


def test_stats_are_detached_and_backward_runs_once():
    hidden, weight, teacher, targets, _ = _nonlinear_loss_inputs()
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, stats = vocab_parallel_token_loss(h, w, targets, teacher,
                                            token_loss=lambda st, rows: st.reverse_kl.sum())
    assert loss.requires_grad and not any(t.requires_grad for t in stats)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def test_token_loss_must_return_a_scalar():
    hidden, weight, teacher, targets, _ = _nonlinear_loss_inputs()
    with pytest.raises(ValueError, match="token_loss must return a scalar tensor"):
        vocab_parallel_token_loss(hidden, weight, targets, teacher, token_loss=lambda st, rows: st.reverse_kl)


def test_a_loss_without_gradient_gives_zero_gradients():
    """A loss that does not depend on the statistics (e.g. every token gated off) is
    allowed: zero gradients, no error."""
    hidden, weight, teacher, targets, _ = _nonlinear_loss_inputs()
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = vocab_parallel_token_loss(h, w, targets, teacher, token_loss=lambda st, rows: torch.tensor(0.0))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0
