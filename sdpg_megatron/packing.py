"""THD packing: a micro-batch's sequences as one row, without padding between them.

With transformer-engine on a GPU (`schedule.pack_sequences`), Megatron runs a micro-batch
as one row of concatenated sequences ([t, 1, H], qkv_format "thd"); attention and RoPE
see where each sequence starts from cumulative lengths (`PackedSeqParams`). This module
is the bookkeeping, pure torch:

    padded rows [b, S]:   a a a . .      packed row [1, L]:   a a a b b b b c c | pad
                          b b b b .      cu_seqlens          0     3       7   9
                          c c . . .      cu_seqlens_padded   0     3       7      L

Each sequence's slot is its length rounded up to `sequence_multiple` (context
parallelism splits every sequence into 2·CP chunks); the row is rounded up to
`row_multiple` (sequence parallelism splits it over the TP ranks) by growing the last
slot, so padding sits only at the row's end and no padding lies between sequences.
Positions restart at 0 in each slot. Rows are concatenated in order and positions keep
their order within a row, so the packed response mask selects the response tokens in
the micro-batch's flat (row, position) order: per-token results need no remapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class PackedLayout:
    """Where each sequence of a micro-batch sits in its packed row (CPU tensors)."""

    lengths: tuple[int, ...]  # each sequence's real length
    cu_seqlens: torch.Tensor  # [n + 1] int32, cumulative real lengths
    cu_seqlens_padded: torch.Tensor  # [n + 1] int32, where each slot starts; the last entry is L
    max_seqlen: int  # the longest slot (RoPE needs frequencies for every position in it)

    @property
    def total(self) -> int:
        return int(self.cu_seqlens_padded[-1])


@dataclass
class PackedView:
    """One view of a micro-batch as a packed row."""

    tokens: torch.Tensor  # [1, L]
    positions: torch.Tensor  # [1, L], restarting at 0 in each slot
    response_mask: torch.Tensor  # [1, L] bool, True where the position predicts a response token
    layout: PackedLayout


def packing_multiples(*, tensor_parallel: int, sequence_parallel: bool, context_parallel: int = 1) -> tuple[int, int]:
    """(sequence_multiple, row_multiple) for `packed_layout`.

    Sequence parallelism splits the packed row over the TP ranks; context parallelism
    splits each sequence into 2·CP chunks (each of which sequence parallelism splits again).
    The recipe runs with CP = 1."""
    tp = tensor_parallel if sequence_parallel else 1
    if context_parallel > 1:
        sequence_multiple = 2 * context_parallel * tp
        return sequence_multiple, sequence_multiple
    return 1, tp


def packed_layout(lengths: Sequence[int], *, sequence_multiple: int = 1, row_multiple: int = 1) -> PackedLayout:
    """Slots of `lengths` rounded up to `sequence_multiple`, the last slot grown until the
    row is a multiple of `row_multiple` (and of `sequence_multiple`)."""
    if not lengths:
        raise ValueError("a packed row needs at least one sequence")
    if min(lengths) < 0 or sequence_multiple < 1 or row_multiple < 1:
        raise ValueError(f"lengths must be >= 0 and multiples >= 1, got {list(lengths)}, "
                         f"{sequence_multiple}, {row_multiple}")
    slots = [-(-n // sequence_multiple) * sequence_multiple for n in lengths]
    multiple = math.lcm(sequence_multiple, row_multiple)
    slots[-1] += -sum(slots) % multiple
    zero = torch.zeros(1, dtype=torch.int32)
    return PackedLayout(
        lengths=tuple(int(n) for n in lengths),
        cu_seqlens=torch.cat([zero, torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)]),
        cu_seqlens_padded=torch.cat([zero, torch.tensor(slots, dtype=torch.int32).cumsum(0, dtype=torch.int32)]),
        max_seqlen=max(slots),
    )


def packed_slots(layout: PackedLayout, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per packed position [L]: its sequence (slot) index, its offset in the slot (the
    position id) and whether it holds a real token (False: padding)."""
    starts = layout.cu_seqlens_padded.to(device=device, dtype=torch.long)
    position = torch.arange(layout.total, device=device)
    slot = torch.searchsorted(starts[1:], position, right=True)  # empty slots are skipped
    offset = position - starts[slot]
    real = offset < torch.tensor(layout.lengths, device=device)[slot]
    return slot, offset, real


def pack_rows(rows: torch.Tensor, layout: PackedLayout, fill) -> torch.Tensor:
    """[b, S, ...] padded rows → [L, ...]: each row's first `layout.lengths[i]` entries,
    row after row in their slots, `fill` elsewhere."""
    assert rows.shape[0] == len(layout.lengths) and max(layout.lengths) <= rows.shape[1], (rows.shape, layout.lengths)
    slot, offset, real = packed_slots(layout, rows.device)
    packed = rows.new_full((layout.total, *rows.shape[2:]), fill)
    packed[real] = rows[slot[real], offset[real]]
    return packed


def pack_view(tokens: torch.Tensor, response_mask: torch.Tensor, lengths: Sequence[int], *,
              sequence_multiple: int = 1, row_multiple: int = 1, pad_id: int = 0) -> PackedView:
    """One view of a micro-batch ([b, S] tokens and response mask, each row's real length)
    as a packed row. The response mask only marks real positions (a row's response ends
    before its length), so the packed mask selects the same tokens in the same order."""
    layout = packed_layout(lengths, sequence_multiple=sequence_multiple, row_multiple=row_multiple)
    _, offset, _ = packed_slots(layout, tokens.device)
    return PackedView(tokens=pack_rows(tokens, layout, pad_id)[None], positions=offset[None],
                      response_mask=pack_rows(response_mask, layout, False)[None], layout=layout)
