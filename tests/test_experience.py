"""Rollouts → Megatron micro-batches: token layout of both views, mini-batch / DP slicing,
empty responses."""

from __future__ import annotations

import pytest
import torch

from sdpg_megatron.experience import Sample, make_step_batch, micro_batches, minibatch_sample_ids


def _sample(group, prompt, teacher, response):
    return Sample(group=group, student_prompt=prompt, teacher_prompt=teacher, response=response,
                  rollout_logprobs=[-0.1 * (i + 1) for i in range(len(response))], reward=0.0, correct=False)


def test_both_views_select_the_same_response_tokens():
    samples = [_sample(0, [1, 2, 3], [1, 2, 9, 9, 3], [40, 41]), _sample(0, [1, 2, 3], [1, 2, 9, 9, 3], [50, 51, 52])]
    batch = make_step_batch(1, samples, group_size=2)
    assert batch.student_length == 8 and batch.teacher_length == 8  # padded to a multiple of 8
    (mb,) = micro_batches(batch, [0, 1], 4, torch.tensor([0.5, -0.5]), pad_id=0)
    # position p predicts token p + 1: the response tokens sit right after each prompt
    assert mb.tokens[mb.response_mask.roll(1, dims=1)].tolist() == [40, 41, 50, 51, 52]
    assert mb.teacher_tokens[mb.teacher_response_mask.roll(1, dims=1)].tolist() == [40, 41, 50, 51, 52]
    assert mb.targets.tolist() == [40, 41, 50, 51, 52]
    assert mb.advantages.tolist() == [0.5, 0.5, -0.5, -0.5, -0.5]
    assert mb.sample_ids.tolist() == [0, 0, 1, 1, 1]
    assert mb.rollout_logprobs.tolist() == pytest.approx([-0.1, -0.2, -0.1, -0.2, -0.3])


def test_empty_response_contributes_no_tokens():
    samples = [_sample(0, [1, 2], [1, 2, 7], []), _sample(0, [1, 2], [1, 2, 7], [5])]
    batch = make_step_batch(1, samples, group_size=2)
    empty, one = micro_batches(batch, [0, 1], 1, torch.zeros(2), pad_id=0)
    assert empty.num_tokens == 0 and not empty.response_mask.any() and not empty.teacher_response_mask.any()
    assert one.num_tokens == 1 and one.targets.tolist() == [5]


def test_minibatches_are_whole_groups_dealt_to_dp_ranks():
    samples = [_sample(g, [1], [1], [2]) for g in range(4) for _ in range(2)]
    batch = make_step_batch(3, samples, group_size=2)
    assert minibatch_sample_ids(batch, 2, dp_size=2, dp_rank=0) == [[0, 1], [4, 5]]
    assert minibatch_sample_ids(batch, 2, dp_size=2, dp_rank=1) == [[2, 3], [6, 7]]
    with pytest.raises(ValueError, match="minibatches_per_step=3"):
        minibatch_sample_ids(batch, 3, dp_size=1, dp_rank=0)
    with pytest.raises(ValueError, match="data-parallel"):
        minibatch_sample_ids(batch, 4, dp_size=4, dp_rank=0)


def test_logprob_count_mismatch_is_an_error():
    bad = _sample(0, [1], [1], [2, 3])
    bad.rollout_logprobs = [-1.0]
    batch = make_step_batch(1, [bad], group_size=1)
    with pytest.raises(ValueError, match="2 response tokens but 1 rollout log-probs"):
        micro_batches(batch, [0], 1, torch.zeros(1), pad_id=0)
