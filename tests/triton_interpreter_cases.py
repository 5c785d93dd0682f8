"""The Triton kernels of `vocab_parallel_token_stats` (backend="triton"), on CPU.

Triton's interpreter runs the same kernels with numpy, so their math — online max/sum-exp
across tiles and vocabulary splits, the KL and entropy partials, the target logit, padding
and masks, ∂z and the block-wise ∂h/∂W GEMMs — is checked here against the fp64
full-vocabulary oracle, at TP 1 and 2, without a GPU. On a GPU
`benchmarks/gpu/bench_fused_loss.py` checks the compiled kernels against the torch path.

The interpreter must be on before Triton is first imported (its standard library is
decorated at import), so these cases run in their own pytest process started by
`tests/test_triton_token_stats.py` with TRITON_INTERPRET=1; this file is not collected
by the main run.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "tests/triton_interpreter_cases.py needs TRITON_INTERPRET=1 from the start of the process; "
        "run it through tests/test_triton_token_stats.py"
    )

from sdpg_megatron.parallel import triton_token_stats  # noqa: E402
from sdpg_megatron.parallel import split_vocab_shard, vocab_parallel_token_stats  # noqa: E402
from sdpg_megatron.parallel.reference import naive_token_stats  # noqa: E402
from sdpg_megatron.parallel.vocab_parallel import resolve_backend  # noqa: E402
from tests.helpers import (  # noqa: E402
    CASES, RTOL, assert_matches_reference, distributed_stats, make_inputs, reference_stats, relative_error,
    results_at_tp, single_pass_stats,
)


def _triton_stats(rank: int, world_size: int) -> dict:
    # Spawned ranks inherit TRITON_INTERPRET=1 from this process.
    assert triton_token_stats._INTERPRET
    return distributed_stats(rank, world_size, "triton")


@pytest.fixture(scope="module", params=(1, 2), ids=lambda tp: f"tp{tp}")
def triton_results(request):
    return request.param, results_at_tp(_triton_stats, request.param)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernels_match_naive_fp64_reference(triton_results, case):
    tp, per_rank = triton_results
    assert_matches_reference(tp, per_rank, case)
    # The same two forward collectives as the torch path (the splits merge locally).
    views, stats = (2, 5) if case.teacher else (1, 3)
    expected_calls = [] if tp == 1 else [views * case.num_tokens, stats * case.num_tokens]
    for results in per_rank:
        assert [numel for _, numel in results[case.name]["forward_calls"]] == expected_calls


def test_one_split_walks_every_tile_online(monkeypatch):
    """Each program walks its whole vocabulary tile by tile: every running maximum moves
    many times, so the online rescaling of S, B and A is what is being checked."""
    config = triton_token_stats.INTERPRETER_CONFIG

    def one_split(num_tokens, valid_rows, cfg, device):
        return 1, max(1, -(-valid_rows // cfg.block_n)) * cfg.block_n

    monkeypatch.setattr(triton_token_stats, "_vocab_splits", one_split)
    for case in CASES:
        assert case.vocab > 2 * config.block_n  # several tiles per program
        results = [distributed_stats(0, 1, "triton")]
        assert_matches_reference(1, results, case)


def test_several_splits_and_gradient_blocks(monkeypatch):
    """A vocabulary walked in many forward splits and three ∂z column blocks."""
    case = CASES[4]  # large logits, temperature 1.3
    student, teacher, weight, targets, _, upstream = make_inputs(case)
    budget = case.num_tokens * 4 * 64  # 64 fp32 columns of ∂z per block
    monkeypatch.setitem(triton_token_stats._DZ_BYTES, "cpu", budget)
    splits, _ = triton_token_stats._vocab_splits(
        case.num_tokens, case.vocab, triton_token_stats.INTERPRETER_CONFIG, student.device
    )
    assert splits >= 3
    student.requires_grad_(True)
    weight.requires_grad_(True)
    stats = vocab_parallel_token_stats(student, weight, targets, teacher, vocab_size=case.vocab,
                                       temperature=case.temperature, backend="triton")
    outputs = [stats.logprobs, stats.entropy, stats.reverse_kl]
    sum((o * g).sum() for o, g in zip(outputs, upstream)).backward()
    expected_outputs, expected_grad_hidden, expected_grad_weight = reference_stats(case)
    for actual, expected in zip(outputs, expected_outputs):
        assert relative_error(actual.detach(), expected) <= RTOL
    assert relative_error(student.grad, expected_grad_hidden) <= RTOL
    assert relative_error(weight.grad, expected_grad_weight) <= RTOL


def test_tma_descriptors_and_flattened_forward_loop(monkeypatch):
    """The TMA configurations: operand tiles through tensor descriptors, which read zeros
    past the tensors' edges instead of masking (ragged tokens, hidden sizes and padded
    shards in CASES), and the forward's loop nest flattened."""
    tma_config = dataclasses.replace(triton_token_stats.INTERPRETER_CONFIG, tma=True, flatten=True)
    monkeypatch.setattr(triton_token_stats, "INTERPRETER_CONFIG", tma_config)
    monkeypatch.setattr(triton_token_stats, "_chosen", {})
    made = []
    original = triton_token_stats.TensorDescriptor.from_tensor

    def counting(tensor, block_shape):
        made.append(tuple(block_shape))
        return original(tensor, block_shape)

    monkeypatch.setattr(triton_token_stats.TensorDescriptor, "from_tensor", counting)
    results = [distributed_stats(0, 1, "triton")]
    for case in CASES:
        assert_matches_reference(1, results, case)
    assert (tma_config.block_n, tma_config.block_k) in made and (tma_config.block_m, tma_config.block_k) in made
    assert set(triton_token_stats._chosen.values()) == {tma_config}


def test_tma_needs_aligned_row_major_inputs():
    aligned = torch.zeros(8, 16, dtype=torch.bfloat16)
    assert triton_token_stats.tma_supported(aligned, aligned[:4])
    assert not triton_token_stats.tma_supported(aligned, torch.zeros(8, 3, dtype=torch.bfloat16))  # 6-byte rows
    assert not triton_token_stats.tma_supported(aligned, aligned.t())  # column-major
    assert not triton_token_stats.tma_supported(aligned, aligned[:0])  # an all-padding shard
    assert not triton_token_stats.tma_supported(torch.zeros(129, dtype=torch.bfloat16)[1:].view(8, 16))  # 2-byte offset
    tma_config = dataclasses.replace(triton_token_stats.INTERPRETER_CONFIG, tma=True)
    odd = torch.zeros(8, 3)
    with pytest.raises(ValueError, match="uses TMA"):
        triton_token_stats.local_partials(odd, None, torch.zeros(5, 3), torch.zeros(8, dtype=torch.int32), 5, 1.0,
                                          config=tma_config)


def test_experimental_configurations_are_opt_in(monkeypatch):
    """Experimental configurations (flattened loops, which measured slower on an H100, and
    untimed large tiles) are tuned only under SDPG_TRITON_EXPERIMENTAL=1; TMA ones only
    where TMA applies, flattened loops only in the forward; SDPG_TRITON_CONFIG can force
    any configuration allowed."""
    aligned = torch.zeros(8, 16, dtype=torch.bfloat16)
    odd = torch.zeros(8, 3, dtype=torch.bfloat16)
    experimental = set(triton_token_stats.EXPERIMENTAL_CONFIGS)
    assert experimental and not experimental & set(triton_token_stats.GPU_CONFIGS)
    assert not any(c.flatten for c in triton_token_stats.GPU_CONFIGS)
    assert not triton_token_stats.GPU_CONFIGS[0].tma  # the tuner's reference: pointer loads

    monkeypatch.delenv("SDPG_TRITON_EXPERIMENTAL", raising=False)
    tuned, forceable = triton_token_stats._candidates((aligned, aligned), forward=True)
    assert tuned == list(triton_token_stats.GPU_CONFIGS) and experimental <= set(forceable)
    assert any(c.tma for c in tuned)
    tuned, _ = triton_token_stats._candidates((aligned, odd), forward=True)
    assert tuned == [c for c in triton_token_stats.GPU_CONFIGS if not c.tma]
    monkeypatch.setenv("SDPG_TRITON_EXPERIMENTAL", "1")
    tuned, _ = triton_token_stats._candidates((aligned, aligned), forward=True)
    assert experimental <= set(tuned)
    tuned, forceable = triton_token_stats._candidates((aligned, aligned), forward=False)
    assert not any(c.flatten for c in tuned + forceable) and any(c.tma for c in tuned)
    tuned, forceable = triton_token_stats._candidates((aligned, odd), forward=True)
    assert not any(c.tma for c in tuned + forceable) and any(c.flatten for c in tuned)

    tma_name = str(next(c for c in experimental if c.tma))
    monkeypatch.setenv("SDPG_TRITON_CONFIG", tma_name)
    monkeypatch.setattr(triton_token_stats, "_chosen", {})
    with pytest.raises(ValueError, match=f"SDPG_TRITON_CONFIG='{tma_name}' is not one of"):
        triton_token_stats._choose(("forced",), None, triton_token_stats._candidates((odd,), forward=True), None)
    chosen = triton_token_stats._choose(("forced",), None, triton_token_stats._candidates((aligned,), forward=True), None)
    assert str(chosen) == tma_name


def test_the_tuner_drops_a_configuration_that_disagrees(monkeypatch):
    """On a GPU the tuner times every candidate, then checks its pick against the first
    configuration that ran; a wrong result (a miscompiled candidate) is passed over."""
    configs = triton_token_stats.GPU_CONFIGS[:4]
    times = {configs[0]: 3.0, configs[1]: 1.0, configs[2]: 2.0}  # configs[3] fails to compile
    outputs = {configs[0]: torch.tensor([1.0, float("-inf")]), configs[1]: torch.tensor([1.5, float("-inf")]),
               configs[2]: torch.tensor([1.0 + 1e-7, float("-inf")])}
    current = {}

    def launch(cfg):
        if cfg == configs[3]:
            raise RuntimeError("out of shared memory")
        current["cfg"] = cfg
        return outputs[cfg]

    def fake_bench(fn, **_):
        fn()
        return times[current["cfg"]]

    monkeypatch.setattr(triton_token_stats.triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(triton_token_stats, "_tuning", {})
    with pytest.warns(RuntimeWarning, match="disagrees"):
        chosen = triton_token_stats._fastest_agreeing(("test",), launch, list(configs), lambda out: out)
    assert chosen == configs[2]  # the fastest, configs[1], is wrong; equal infinities agree
    report = triton_token_stats.tuning_report()["test"]
    assert set(report["disagreed"]) == {str(configs[1])} and set(report["failed"]) == {str(configs[3])}
    assert report["ms"] == {str(c): t for c, t in times.items()}

    outputs[configs[2]] = torch.tensor([float("nan"), float("-inf")])
    with pytest.warns(RuntimeWarning):
        assert triton_token_stats._fastest_agreeing(("test",), launch, list(configs), lambda out: out) == configs[0]


def test_bf16_inputs_against_fp64_of_the_same_values():
    """bf16 hidden states and weight (the GPU case): fp32 statistics, ∂z rounded to bf16."""
    generator = torch.Generator().manual_seed(7)
    num_tokens, hidden, vocab = 45, 48, 320
    student = torch.randn(num_tokens, hidden, generator=generator).bfloat16()
    teacher = (student.float() + 0.5 * torch.randn(num_tokens, hidden, generator=generator)).bfloat16()
    weight = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).bfloat16()
    targets = torch.randint(0, 300, (num_tokens,), generator=generator)
    upstream = torch.randn(3, num_tokens, generator=generator)

    for tp_rank in range(2):  # each shard of a TP2 split, as one rank would see it
        shard = split_vocab_shard(weight, 2, tp_rank)
        assert shard.shape[0] == vocab // 2
    student_grad = student.clone().requires_grad_(True)
    weight_grad = weight.clone().requires_grad_(True)
    stats = vocab_parallel_token_stats(student_grad, weight_grad, targets, teacher, vocab_size=300,
                                       temperature=0.9, backend="triton")
    outputs = [stats.logprobs, stats.entropy, stats.reverse_kl]
    assert all(o.dtype == torch.float32 for o in outputs)
    sum((o * g).sum() for o, g in zip(outputs, upstream)).backward()
    assert student_grad.grad.dtype == torch.bfloat16 and weight_grad.grad.dtype == torch.bfloat16

    student64 = student.double().requires_grad_(True)
    weight64 = weight.double().requires_grad_(True)
    reference = naive_token_stats(student64, weight64, targets, teacher.double(), vocab_size=300, temperature=0.9)
    expected = [reference.logprobs, reference.entropy, reference.reverse_kl]
    sum((o * g.double()).sum() for o, g in zip(expected, upstream)).backward()
    for actual, wanted in zip(outputs, expected):
        assert relative_error(actual.detach(), wanted.detach()) <= 1e-5
    # bf16 gradients: one rounding of ∂z and of the result, ~2⁻⁸ each.
    assert relative_error(student_grad.grad, student64.grad) <= 1e-2
    assert relative_error(weight_grad.grad, weight64.grad) <= 1e-2


def test_backend_choice(monkeypatch):
    cpu_bf16 = torch.zeros(2, 4, dtype=torch.bfloat16)
    assert resolve_backend("auto", cpu_bf16) == "torch"  # auto never picks the interpreter
    assert resolve_backend("triton", cpu_bf16) == "triton"  # explicit, under the interpreter
    monkeypatch.setenv("SDPG_LOSS_BACKEND", "torch")  # no longer read: the caller's setting decides
    assert resolve_backend("triton", cpu_bf16) == "triton"
    with pytest.raises(ValueError, match="backend .model.loss_backend. must be one of"):
        resolve_backend("cuda", cpu_bf16)
    monkeypatch.setattr(triton_token_stats, "_INTERPRET", False)
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        resolve_backend("triton", cpu_bf16)


# --------------------------------------------------------------------------- single pass


@pytest.mark.parametrize("tp", [1, 2])
def test_single_pass_row_kernels_match_naive_fp64_reference(tp):
    """`vocab_parallel_token_loss(backend="triton")`: the row kernels for the statistics and
    ∂z inside the chunked single pass, every case, at TP 1 and 2."""
    per_rank = results_at_tp(single_pass_stats, tp, "triton")
    for case in CASES:
        assert_matches_reference(tp, per_rank, case)


@pytest.mark.parametrize("teacher", [True, False])
def test_row_kernels_against_the_torch_rows(teacher):
    """Several rows per program, column blocks with a ragged end, a target owned by another
    rank (−1), and ∂z written in bf16 and in fp32."""
    from sdpg_megatron.parallel import triton_rows
    from sdpg_megatron.parallel.single_pass import _TorchRows
    from sdpg_megatron.parallel.chunks import rescale_partials

    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 203, generator=generator) * 3
    student, teacher_logits = logits[0], (logits[1] if teacher else None)
    targets = torch.tensor([3, -1, 202, 0, 57], dtype=torch.int32)
    expected_max, expected = _TorchRows.row_partials(student, teacher_logits, targets)
    maxima, partials = triton_rows.row_partials(student, teacher_logits, targets)
    assert torch.equal(maxima, expected_max)
    assert relative_error(rescale_partials(partials, maxima, expected_max, teacher), expected.double()) < 1e-6
    coefficients = torch.randn(6, 5, generator=generator)
    coefficients[0], coefficients[1] = torch.logsumexp(student, 1), torch.logsumexp(logits[1], 1)
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 8e-3)):
        reference = _TorchRows.row_grads(student, teacher_logits, targets, coefficients, 0.7,
                                         out=torch.empty(5, 203)).double()
        out = torch.full((5, 203), float("nan"), dtype=dtype)
        triton_rows.row_grads(student, teacher_logits, targets, coefficients, 0.7, out=out)
        assert relative_error(out, reference) < tolerance, dtype
