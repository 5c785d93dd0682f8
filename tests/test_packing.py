"""THD packing bookkeeping (sdpg_megatron/packing.py) against naive references.

The THD forward itself needs transformer-engine on a GPU and does not run here. What is
tested is everything it is given: the slots and cumulative lengths, position ids that
restart per sequence, the padding of the row to the multiple TP/SP/CP need, and that the
packed response mask selects every sample's response tokens in the padded path's order.
Two consumers of the cumulative lengths run on CPU against the padded rows: a naive
per-sequence causal attention, and Megatron's own (unfused) THD RoPE, the path its
attention takes with `apply_rope_fusion=False` (this recipe's setting).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

LAYOUTS = [  # (lengths, sequence_multiple, row_multiple)
    ([5, 3, 7], 1, 1), ([5, 3, 7], 1, 2), ([5, 3, 7], 1, 8), ([5, 3, 7], 4, 4), ([4, 0, 2], 1, 2),
    ([1], 1, 8), ([8, 8], 1, 8), ([3, 9, 2, 6], 2, 3), ([3, 9, 2, 6], 8, 8),
]


def _naive_slots(lengths, sequence_multiple, row_multiple):
    slots = []
    for n in lengths:
        slot = n
        while slot % sequence_multiple:
            slot += 1
        slots.append(slot)
    while sum(slots) % sequence_multiple or sum(slots) % row_multiple:
        slots[-1] += 1
    return slots


def _naive_pack(rows: list[list[int]], lengths, slots, fill):
    tokens, positions = [], []
    for row, n, slot in zip(rows, lengths, slots):
        tokens += row[:n] + [fill] * (slot - n)
        positions += list(range(slot))
    return tokens, positions


@pytest.mark.parametrize("lengths, sequence_multiple, row_multiple", LAYOUTS)
def test_packed_layout_matches_a_naive_reference(lengths, sequence_multiple, row_multiple):
    from sdpg_megatron.packing import packed_layout

    layout = packed_layout(lengths, sequence_multiple=sequence_multiple, row_multiple=row_multiple)
    slots = _naive_slots(lengths, sequence_multiple, row_multiple)
    assert layout.cu_seqlens.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert layout.cu_seqlens_padded.tolist() == [sum(slots[:i]) for i in range(len(slots) + 1)]
    assert layout.cu_seqlens.dtype == layout.cu_seqlens_padded.dtype == torch.int32  # what TE takes
    assert layout.max_seqlen == max(slots) and layout.total == sum(slots)
    assert layout.total % row_multiple == 0 and all(s % sequence_multiple == 0 for s in slots)
    # padding only after the last sequence: no gap between sequences (TE's flash path needs none)
    assert layout.cu_seqlens[:-1].tolist() == layout.cu_seqlens_padded[:-1].tolist() or sequence_multiple > 1


@pytest.mark.parametrize("lengths, sequence_multiple, row_multiple", LAYOUTS)
def test_pack_rows_and_positions_match_a_naive_reference(lengths, sequence_multiple, row_multiple):
    from sdpg_megatron.packing import pack_rows, pack_view, packed_layout

    generator = torch.Generator().manual_seed(len(lengths) + row_multiple)
    width = max(lengths) + 3
    rows = torch.randint(1, 100, (len(lengths), width), generator=generator)
    mask = torch.rand(len(lengths), width, generator=generator) < 0.5
    mask &= torch.arange(width) < torch.tensor(lengths)[:, None] - 1  # only positions that predict a real token
    layout = packed_layout(lengths, sequence_multiple=sequence_multiple, row_multiple=row_multiple)
    slots = _naive_slots(lengths, sequence_multiple, row_multiple)
    tokens, positions = _naive_pack(rows.tolist(), lengths, slots, -1)
    expected_mask, _ = _naive_pack(mask.tolist(), lengths, slots, False)
    assert pack_rows(rows, layout, -1).tolist() == tokens
    view = pack_view(rows, mask, lengths, sequence_multiple=sequence_multiple, row_multiple=row_multiple, pad_id=-1)
    assert view.tokens.tolist() == [tokens] and view.positions.tolist() == [positions]
    assert view.response_mask.tolist() == [expected_mask] and view.response_mask.dtype == torch.bool
    # trailing feature dimensions travel with their token
    features = torch.randn(len(lengths), width, 2, 3, generator=generator)
    packed = pack_rows(features, layout, 0.0)
    for i, n in enumerate(lengths):
        start = int(layout.cu_seqlens_padded[i])
        assert torch.equal(packed[start : start + n], features[i, :n])


def test_packing_multiples_follow_tensor_sequence_and_context_parallelism():
    from sdpg_megatron.packing import packing_multiples

    assert packing_multiples(tensor_parallel=4, sequence_parallel=False) == (1, 1)
    assert packing_multiples(tensor_parallel=4, sequence_parallel=True) == (1, 4)
    assert packing_multiples(tensor_parallel=2, sequence_parallel=False, context_parallel=2) == (4, 4)
    assert packing_multiples(tensor_parallel=2, sequence_parallel=True, context_parallel=2) == (8, 8)


def test_bad_layouts_are_refused():
    from sdpg_megatron.packing import packed_layout

    with pytest.raises(ValueError, match="at least one sequence"):
        packed_layout([])
    with pytest.raises(ValueError, match=">= 0"):
        packed_layout([3, -1])


def _micro_batch():
    from sdpg_megatron.experience import Sample, make_step_batch, micro_batches

    generator = torch.Generator().manual_seed(3)
    samples = []
    for index, length in enumerate([3, 11, 0, 6, 2, 9]):
        prompt = torch.randint(0, 50, (2 + index % 3,), generator=generator).tolist()
        response = torch.randint(0, 50, (length,), generator=generator).tolist()
        samples.append(Sample(group=index // 3, student_prompt=prompt, teacher_prompt=prompt + [7, 8, 9],
                              response=response, rollout_logprobs=[-1.0] * length, reward=0.0, correct=False))
    batch = make_step_batch(1, samples, 3)
    (mb,) = micro_batches(batch, list(range(6)), 6, torch.zeros(6), 0)
    return mb


@pytest.mark.parametrize("view", ["student", "teacher"])
@pytest.mark.parametrize("multiples", [(1, 1), (1, 8), (4, 8)])
def test_packed_response_positions_map_back_to_the_samples_tokens(view, multiples):
    """The loss reads `response_states(hidden, response_mask)` and the per-token tensors in
    the micro-batch's flat order: the packed row must give the same rows, and each selected
    position must predict the same target token."""
    from sdpg_megatron.model.provider import response_states
    from sdpg_megatron.packing import pack_rows, pack_view

    mb = _micro_batch()
    tokens, mask, lengths = ((mb.teacher_tokens, mb.teacher_response_mask, mb.teacher_lengths) if view == "teacher"
                             else (mb.tokens, mb.response_mask, mb.lengths))
    packed = pack_view(tokens, mask, lengths.tolist(), sequence_multiple=multiples[0], row_multiple=multiples[1])
    assert packed.tokens.shape[1] < tokens.numel()  # padding between sequences is gone
    hidden = torch.randn(tokens.shape[1], tokens.shape[0], 4)  # [s, b, H], Megatron's layout
    packed_hidden = pack_rows(hidden.transpose(0, 1), packed.layout, float("nan"))[:, None]  # [L, 1, H]
    assert torch.equal(response_states(packed_hidden, packed.response_mask), response_states(hidden, mask))
    predicts = packed.response_mask[0].nonzero().squeeze(1) + 1  # position p predicts token p + 1
    assert torch.equal(packed.tokens[0, predicts], mb.targets) and mb.num_tokens == 31


def _causal_attention_by_segment(q, k, v, segment):
    """softmax(q kᵀ / √d) v over [t, h, d] with a causal mask within each segment."""
    t = q.shape[0]
    allowed = torch.ones(t, t, dtype=torch.bool).tril() & (segment[:, None] == segment[None, :])
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def test_attention_over_the_packed_row_equals_attention_over_padded_rows():
    """What TE computes from cu_seqlens_padded and the positions, done naively: each token
    attends causally within its own sequence, positions counted from the sequence start."""
    from sdpg_megatron.packing import pack_rows, pack_view

    lengths, width, heads, dim = [5, 2, 7, 1], 8, 2, 4
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(len(lengths), width, heads, dim, generator=generator)
    position_table = torch.randn(width, heads, dim, generator=generator)
    rows = torch.arange(len(lengths) * width).view(len(lengths), width)
    packed = pack_view(rows, torch.zeros_like(rows, dtype=torch.bool), lengths, row_multiple=4)
    bounds = packed.layout.cu_seqlens_padded.tolist()
    segment = torch.tensor([sum(p >= b for b in bounds[1:]) for p in range(packed.layout.total)])

    def qkv(rows_x, positions):
        h = rows_x + position_table[positions]
        return h * 1.5, h.flip(-1), h * h

    padded = torch.stack([_causal_attention_by_segment(*qkv(x[i], torch.arange(width)), torch.zeros(width))
                          for i in range(len(lengths))])
    packed_x = pack_rows(x, packed.layout, 0.0)
    result = _causal_attention_by_segment(*qkv(packed_x, packed.positions[0]), segment)
    real = pack_rows(torch.ones(len(lengths), width, dtype=torch.bool), packed.layout, False)
    torch.testing.assert_close(result[real], pack_rows(padded, packed.layout, 0.0)[real])


class _OneRank:
    """A context-parallel group of one (Megatron's THD RoPE asks its size and rank)."""

    def size(self):
        return 1

    def rank(self):
        return 0


@pytest.mark.parametrize("lengths, row_multiple", [([5, 3, 7], 4), ([6], 8), ([2, 9], 1)])
def test_megatron_thd_rope_with_these_cu_seqlens_equals_rope_on_padded_rows(lengths, row_multiple):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from sdpg_megatron.packing import pack_rows, packed_layout

    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False,
                             mrope_section=None)
    heads, dim, width = 2, 8, max(lengths) + 2
    inverse_frequency = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

    def frequencies(n):  # Megatron's RotaryEmbedding.get_emb: [n, 1, 1, dim]
        angles = torch.outer(torch.arange(n, dtype=torch.float32), inverse_frequency)
        return torch.cat([angles, angles], -1)[:, None, None, :]

    layout = packed_layout(lengths, row_multiple=row_multiple)
    t = torch.randn(len(lengths), width, heads, dim, generator=torch.Generator().manual_seed(1))
    padded = apply_rotary_pos_emb(t.transpose(0, 1), frequencies(width), config, cp_group=_OneRank())  # sbhd
    # GPTModel sizes the frequencies by max_seqlen under THD; attention passes cu_seqlens_q_padded
    packed = apply_rotary_pos_emb(pack_rows(t, layout, 0.0), frequencies(layout.max_seqlen), config,
                                  cu_seqlens=layout.cu_seqlens_padded, cp_group=_OneRank())
    real = pack_rows(torch.ones(len(lengths), width, dtype=torch.bool), layout, False)
    torch.testing.assert_close(packed[real], pack_rows(padded.transpose(0, 1), layout, 0.0)[real])
    assert not torch.allclose(packed[real], pack_rows(t, layout, 0.0)[real])  # RoPE did rotate


def test_pack_sequences_is_refused_without_transformer_engine_on_a_gpu(monkeypatch):
    import sdpg_megatron.passes
    from sdpg_megatron.config import Config, validate
    from sdpg_megatron.model.qwen3 import qwen3_tiny
    from sdpg_megatron.passes import ModelPasses

    config = Config()
    config.model.hf_dir, config.data.train_files = "m", ("t.parquet",)
    config.schedule.pack_sequences = True
    with pytest.raises(ValueError, match="schedule.pack_sequences.*params_dtype=bfloat16"):
        validate(config)
    config.model.params_dtype = "bfloat16"
    assert validate(config).schedule.pack_sequences
    monkeypatch.setattr(sdpg_megatron.passes, "transformer_engine_available", lambda: False)  # as on this CPU
    with pytest.raises(ValueError, match="schedule.pack_sequences.*transformer-engine on a CUDA GPU.*=false"):
        ModelPasses(config, None, None, arch=qwen3_tiny())
