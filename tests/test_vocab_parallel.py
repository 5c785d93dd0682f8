"""`vocab_parallel_token_stats` against the naive fp64 full-vocabulary reference.

Every case runs at TP = 1, 2 and 4 on spawned gloo ranks (one spawn per TP size serves all
cases); values and both gradients must match the reference gathered over the vocabulary.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdpg_megatron.parallel import padded_vocab_size, split_vocab_shard, vocab_parallel_token_stats
from tests.distributed import run_distributed
from tests.helpers import (
    CASES, RTOL, TP_SIZES, assert_matches_reference, distributed_stats, make_inputs, relative_error, results_at_tp,
)


@pytest.fixture(scope="module", params=TP_SIZES, ids=lambda tp: f"tp{tp}")
def distributed_results(request):
    return request.param, results_at_tp(distributed_stats, request.param)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_naive_fp64_reference(distributed_results, case):
    assert_matches_reference(*distributed_results, case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_exactly_two_forward_collectives(distributed_results, case):
    tp, per_rank = distributed_results
    calls = per_rank[0][case.name]["forward_calls"]
    if tp == 1:
        assert calls == []
        return
    views = 2 if case.teacher else 1
    num_stats = 5 if case.teacher else 3
    assert [numel for _, numel in calls] == [views * case.num_tokens, num_stats * case.num_tokens]
    assert "MAX" in calls[0][0] and "SUM" in calls[1][0]
    # Backward: only the hidden-state gradient is reduced.
    assert [numel for _, numel in per_rank[0][case.name]["backward_calls"]] == [case.num_tokens * case.hidden]


def _megatron_cross_entropy(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        case = CASES[1]  # no padding: Megatron's CE treats every row as a real token
        student, teacher, weight, targets, _, _ = make_inputs(case)
        shard = split_vocab_shard(weight, world_size, rank)
        ours = vocab_parallel_token_stats(
            student, shard, targets, group=parallel_state.get_tensor_model_parallel_group(),
            chunk_size=case.chunk_size,
        ).logprobs
        megatron = -vocab_parallel_cross_entropy((student @ shard.t())[None], targets[None])[0]
        return ours, megatron
    finally:
        parallel_state.destroy_model_parallel()


def test_logprobs_match_megatron_vocab_parallel_cross_entropy():
    for ours, megatron in run_distributed(_megatron_cross_entropy, 2):
        assert relative_error(ours, megatron.double()) <= RTOL


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_never_materialises_full_logits():
    num_tokens, hidden, vocab, chunk = 512, 8, 1024, 16
    student = torch.randn(num_tokens, hidden, requires_grad=True)
    weight = torch.randn(vocab, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (num_tokens,))
    with _LargestTensor() as tracker:
        stats = vocab_parallel_token_stats(student, weight, targets, torch.randn(num_tokens, hidden), chunk_size=chunk)
        (stats.logprobs.sum() + stats.reverse_kl.sum() + stats.entropy.sum()).backward()
    # The workspace (three [16, 1024] chunk buffers) and the weight gradient [1024, 8] are
    # the largest objects: far below the [512, 1024] logits a naive implementation holds.
    assert tracker.largest <= max(3 * chunk * vocab, vocab * hidden)


def test_saved_state_is_linear_in_tokens():
    num_tokens, hidden, vocab = 256, 8, 512
    student = torch.randn(num_tokens, hidden, requires_grad=True)
    weight = torch.randn(vocab, hidden, requires_grad=True)
    teacher = torch.randn(num_tokens, hidden)
    inputs = {t.untyped_storage().data_ptr() for t in (student, weight, teacher)}
    extra_bytes = 0

    def pack(tensor):
        nonlocal extra_bytes
        if tensor.untyped_storage().data_ptr() not in inputs:
            extra_bytes += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vocab_parallel_token_stats(student, weight, torch.randint(0, vocab, (num_tokens,)), teacher)
    assert extra_bytes <= 8 * num_tokens * 8  # a handful of [N] vectors, no [N, V] logits


def test_teacher_receives_no_gradient():
    student = torch.randn(6, 4, requires_grad=True)
    teacher = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(16, 4, requires_grad=True)
    stats = vocab_parallel_token_stats(student, weight, torch.randint(0, 16, (6,)), teacher)
    stats.reverse_kl.sum().backward()
    assert teacher.grad is None
    assert student.grad is not None and weight.grad is not None


def test_kl_of_identical_views_is_zero():
    student = torch.randn(9, 4)
    weight = torch.randn(32, 4)
    stats = vocab_parallel_token_stats(student, weight, torch.randint(0, 32, (9,)), student.clone(), chunk_size=4)
    assert stats.reverse_kl.abs().max() < 1e-6


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(student_hidden=torch.randn(4, 8, 2)), "student_hidden"),
        (dict(weight_shard=torch.randn(16, 5)), "weight_shard"),
        (dict(weight_shard=torch.randn(16, 4, dtype=torch.float64)), "dtype"),
        (dict(target_ids=torch.tensor([0, 1, 2, 16])), "target_ids"),
        (dict(target_ids=torch.tensor([0, -1, 2, 3])), "target_ids"),
        (dict(target_ids=torch.zeros(4)), "target_ids"),
        (dict(teacher_hidden=torch.randn(3, 4)), "teacher_hidden"),
        (dict(mask=torch.ones(5, dtype=torch.bool)), "mask"),
        (dict(vocab_size=17), "vocab_size"),
        (dict(temperature=0.0), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    arguments = dict(
        student_hidden=torch.randn(4, 4), weight_shard=torch.randn(16, 4),
        target_ids=torch.tensor([0, 1, 2, 3]), teacher_hidden=None,
    )
    options = {k: change.pop(k) for k in list(change) if k in ("vocab_size", "temperature", "chunk_size", "mask")}
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        vocab_parallel_token_stats(**arguments, **options)


def test_vocab_not_divisible_by_tp_is_rejected():
    with pytest.raises(ValueError, match="not divisible by tp_size=3"):
        split_vocab_shard(torch.randn(100, 4), tp_size=3, tp_rank=0)
    assert padded_vocab_size(151_669, 2) == 151_808
    assert padded_vocab_size(151_936, 4) % (128 * 4) == 0
