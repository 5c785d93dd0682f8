"""One rollout step's experience, from the driver's rollouts to Megatron micro-batches.

The driver (global rank 0) builds a `StepBatch` — every response with its two prompt
views, the rollout log-probs and its reward — and broadcasts it (`Trainer._from_driver`,
a pickled object over the default group); every rank then cuts the
same batch into PPO mini-batches, takes its data-parallel slice and packs micro-batches.

Token layout of a micro-batch (Megatron's GPT convention, position t predicts token t+1):

    student:  [ student prompt | response | pad ]      teacher: [ teacher prompt | response | pad ]
    response_mask[t] = 1 where tokens[t + 1] is a response token

so `response_states(hidden, response_mask)` selects, in both views, the hidden states that
predict the response tokens — row for row the same tokens, after prefixes of different
lengths (docs/method.md, "Data").
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch


@dataclass
class Sample:
    """One response y_i of a group."""

    group: int  # index of its prompt within the step
    student_prompt: list[int]
    teacher_prompt: list[int]
    response: list[int]
    rollout_logprobs: list[float]  # the engine's log π(y_t) as sampled (one per response token)
    reward: float
    correct: bool
    # The engines' weight version that sampled it (None: not from the fleet). The trainer is
    # at the fleet's version when it trains, so their difference is the sample's staleness:
    # 0 under rollout.mode=sync; 1 under one_step_off, 0 at its first step (docs/rollout.md).
    weight_version: int | None = None
    # MoE models: the engine's expert ids [len(response), MoE layers, top_k] (Rollout.routed_experts),
    # for the routing-mismatch metric (rollout/routing.py); None for dense models
    rollout_routed_experts: Any = None


@dataclass
class StepBatch:
    """Everything every rank needs for one step; samples are ordered group by group."""

    step: int
    samples: list[Sample]
    group_size: int
    student_length: int  # padded sequence lengths (the same for every micro-batch: PP needs it)
    teacher_length: int

    @property
    def num_groups(self) -> int:
        return len(self.samples) // self.group_size


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, S] student view
    positions: torch.Tensor  # [b, S]
    response_mask: torch.Tensor  # [b, S] bool
    teacher_tokens: torch.Tensor  # [b, T]
    teacher_positions: torch.Tensor  # [b, T]
    teacher_response_mask: torch.Tensor  # [b, T] bool
    lengths: torch.Tensor  # [b] each row's unpadded length (student view; THD packing)
    teacher_lengths: torch.Tensor  # [b]
    # Flat [N] over the response tokens of the micro-batch, in (row, position) order.
    targets: torch.Tensor
    rollout_logprobs: torch.Tensor  # the engine's sampling log-probs
    advantages: torch.Tensor
    sample_ids: torch.Tensor  # [N] index of each token's sample within the StepBatch

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device | str) -> MicroBatch:
        """The same micro-batch with every tensor on `device` (the model's)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


SEQUENCE_MULTIPLE = 8  # step batches pad sequences to multiples of this (sequence parallelism splits them by TP)


def padded_length(length: int, multiple: int = SEQUENCE_MULTIPLE) -> int:
    return max(multiple, -(-length // multiple) * multiple)


def make_step_batch(step: int, samples: list[Sample], group_size: int) -> StepBatch:
    if not samples or len(samples) % group_size:
        raise ValueError(f"step {step}: {len(samples)} samples is not a positive multiple of group size {group_size}")
    longest_student = max(len(s.student_prompt) + len(s.response) for s in samples)
    longest_teacher = max(len(s.teacher_prompt) + len(s.response) for s in samples)
    return StepBatch(step, samples, group_size, padded_length(longest_student), padded_length(longest_teacher))


def minibatch_sample_ids(batch: StepBatch, num_minibatches: int, dp_size: int, dp_rank: int) -> list[list[int]]:
    """For each PPO mini-batch, this data-parallel rank's sample indices.

    Mini-batches are contiguous runs of whole groups (docs/method.md: 16 prompts each); a
    mini-batch's samples are dealt to DP ranks in contiguous slices.
    """
    if batch.num_groups % num_minibatches:
        raise ValueError(
            f"{batch.num_groups} prompts cannot be cut into schedule.minibatches_per_step={num_minibatches} "
            "equal mini-batches"
        )
    per_minibatch = len(batch.samples) // num_minibatches
    if per_minibatch % dp_size:
        raise ValueError(
            f"a mini-batch of {per_minibatch} responses cannot be split over {dp_size} data-parallel ranks; "
            "make (prompts_per_step / minibatches_per_step) × group_size divisible by the DP size"
        )
    per_rank = per_minibatch // dp_size
    return [
        list(range(m * per_minibatch + dp_rank * per_rank, m * per_minibatch + (dp_rank + 1) * per_rank))
        for m in range(num_minibatches)
    ]


def micro_batches(
    batch: StepBatch, sample_ids: list[int], micro_batch_size: int, advantages: torch.Tensor, pad_id: int,
    device: torch.device | str = "cpu", *, max_tokens: int | None = None,
) -> list[MicroBatch]:
    """Pack `sample_ids` into micro-batches, on `device`.

    max_tokens None: `micro_batch_size` rows each (the last may be shorter), every one
    padded to the step's longest sequence (the shape the pipeline schedule needs).
    max_tokens set (dynamic batching, `schedule.max_tokens_per_micro_batch`): the samples
    sorted by length and cut by `token_budget_groups`, each micro-batch padded only to its
    own longest row; rows × padded length stays within the budget (a single longer sample
    gets a micro-batch of its own). Per-token results keep each micro-batch's own order,
    so every pass that is given the same arguments sees the same micro-batches."""
    if max_tokens is None:
        return [
            _pack(batch, sample_ids[i : i + micro_batch_size], advantages, pad_id).to(device)
            for i in range(0, len(sample_ids), micro_batch_size)
        ]
    return [_pack(batch, ids, advantages, pad_id, own_length=True).to(device)
            for ids in token_budget_groups(batch, sample_ids, max_tokens)]


def sequence_lengths(batch: StepBatch, index: int) -> tuple[int, int]:
    """(student, teacher) lengths of sample `index`, unpadded."""
    sample = batch.samples[index]
    return len(sample.student_prompt) + len(sample.response), len(sample.teacher_prompt) + len(sample.response)


# A row joins a micro-batch only while padding it to the micro-batch's width wastes at most
# this fraction of that width, so computed / real tokens stays near 1 + this.
MAX_ROW_PADDING = 0.1


def token_budget_groups(batch: StepBatch, sample_ids: list[int], max_tokens: int) -> list[list[int]]:
    """`sample_ids` sorted longest first (so that rows of similar length share a
    micro-batch) and cut into groups whose rows × padded length (the longer of the two
    views, rounded up to SEQUENCE_MULTIPLE) is at most `max_tokens` and whose rows are each
    within MAX_ROW_PADDING of the group's width (its first row's)."""
    widths = {i: padded_length(max(sequence_lengths(batch, i))) for i in sample_ids}
    groups: list[list[int]] = []
    for index in sorted(sample_ids, key=widths.__getitem__, reverse=True):
        if groups:
            group, width = groups[-1], widths[groups[-1][0]]
            if (len(group) + 1) * width <= max_tokens and widths[index] >= (1 - MAX_ROW_PADDING) * width:
                group.append(index)
                continue
        groups.append([index])
    return groups


def _pack(batch: StepBatch, ids: list[int], advantages: torch.Tensor, pad_id: int, *,
          own_length: bool = False) -> MicroBatch:
    rows = len(ids)
    S, T = batch.student_length, batch.teacher_length
    if own_length:  # padded to this micro-batch's longest row only
        S = padded_length(max(sequence_lengths(batch, i)[0] for i in ids))
        T = padded_length(max(sequence_lengths(batch, i)[1] for i in ids))
    tokens = torch.full((rows, S), pad_id, dtype=torch.long)
    teacher_tokens = torch.full((rows, T), pad_id, dtype=torch.long)
    mask = torch.zeros(rows, S, dtype=torch.bool)
    teacher_mask = torch.zeros(rows, T, dtype=torch.bool)
    targets, rollout_logprobs, token_advantages, sample_ids = [], [], [], []
    for row, index in enumerate(ids):
        sample = batch.samples[index]
        response = sample.response
        if len(sample.rollout_logprobs) != len(response):
            raise ValueError(
                f"sample {index}: {len(response)} response tokens but {len(sample.rollout_logprobs)} rollout log-probs"
            )
        for view, mask_view, prompt in ((tokens, mask, sample.student_prompt), (teacher_tokens, teacher_mask, sample.teacher_prompt)):
            sequence = prompt + response
            view[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            # position p predicts token p + 1: the response starts at len(prompt)
            mask_view[row, len(prompt) - 1 : len(prompt) - 1 + len(response)] = True
        targets.extend(response)
        rollout_logprobs.extend(sample.rollout_logprobs)
        token_advantages.extend([float(advantages[index])] * len(response))
        sample_ids.extend([index] * len(response))
    positions = torch.arange(S).expand(rows, S)
    teacher_positions = torch.arange(T).expand(rows, T)
    return MicroBatch(
        tokens=tokens, positions=positions, response_mask=mask,
        teacher_tokens=teacher_tokens, teacher_positions=teacher_positions, teacher_response_mask=teacher_mask,
        lengths=torch.tensor([sequence_lengths(batch, i)[0] for i in ids], dtype=torch.long),
        teacher_lengths=torch.tensor([sequence_lengths(batch, i)[1] for i in ids], dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        rollout_logprobs=torch.tensor(rollout_logprobs, dtype=torch.float32),
        advantages=torch.tensor(token_advantages, dtype=torch.float32),
        sample_ids=torch.tensor(sample_ids, dtype=torch.long),
    )


def gated_token_scale(batch: StepBatch, advantages: torch.Tensor, minibatch: int, num_minibatches: int) -> float:
    """(all response tokens) / (tokens of samples with A > 0) of PPO mini-batch `minibatch`,
    over every data-parallel rank: turns the token-mean over all tokens into one over the
    gated tokens (algorithm.loss_tokens="gated")."""
    per_minibatch = len(batch.samples) // num_minibatches
    ids = range(minibatch * per_minibatch, (minibatch + 1) * per_minibatch)
    lengths = [len(batch.samples[i].response) for i in ids]
    gated = sum(length for i, length in zip(ids, lengths) if advantages[i] > 0)
    return sum(lengths) / gated if gated else 0.0
