"""Routing mismatch between the rollout engines and the trainer (mixture-of-experts models).

A token's route at one MoE layer is the set of top-k experts its router picks. The engine
that sampled a response and the trainer that scores it run the same weights through
different kernels, so near-tied router logits can send a token to different experts, and
its log-probs then differ by more than rounding. The metric counts that, on the response
tokens of a step, at the positions whose hidden states predict them (the positions of
`response_mask`: the last prompt token and every response token but the last):

- per layer: the fraction of tokens whose top-k set differs at that layer;
- overall: the fraction of (token, layer) pairs that differ;
- any layer: the fraction of tokens that differ at one layer at least.

The engine side is each sample's `rollout_routed_experts` ([response length, MoE layers,
top_k] expert ids, `engine.py`); the trainer side is Megatron's own routing of the same
tokens, recorded through its router-replay hook (`TopKRouter.router_replay`, the one
`TransformerConfig.moe_enable_routing_replay` installs) by `recorded_routing` during a
forward pass. `RoutingMismatchMeter` collects both per micro-batch and reduces over ranks.

Rollout routing replay ("R3"): `replayed_routing` makes Megatron's routers use the
engine's experts at the response positions (`replay_targets`) and their own choice
elsewhere; the routing weights are still the live router's (its logits at the replayed
experts), so the router keeps its gradient. One router call per forward and target: not
for passes that recompute activations in the backward (`recompute_granularity=full`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class RoutingMismatch:
    """Counts of differing routes over `tokens` tokens."""

    differing: torch.Tensor  # [layers] tokens whose top-k set differs at each layer
    any_layer: int  # tokens that differ at one layer at least
    tokens: int

    @property
    def per_layer(self) -> list[float]:
        return (self.differing.double() / max(self.tokens, 1)).tolist()

    @property
    def overall(self) -> float:
        """The fraction of (token, layer) pairs whose top-k sets differ."""
        return self.differing.sum().item() / max(self.tokens * self.differing.numel(), 1)

    @property
    def any_fraction(self) -> float:
        return self.any_layer / max(self.tokens, 1)


def _as_tensor(ids) -> torch.Tensor:
    return torch.from_numpy(np.asarray(ids)).long() if not isinstance(ids, torch.Tensor) else ids.long()


def differing_routes(engine, trainer) -> torch.Tensor:
    """[N, layers] True where the top-k sets differ; `engine` and `trainer` are expert ids
    [N, layers, top_k] (tensors or arrays, any integer dtype; order within top-k ignored)."""
    engine, trainer = _as_tensor(engine), _as_tensor(trainer)
    if engine.shape != trainer.shape or engine.dim() != 3:
        raise ValueError(f"expert ids must both be [tokens, layers, top_k]: engine {tuple(engine.shape)}, "
                         f"trainer {tuple(trainer.shape)}")
    return (engine.sort(dim=-1).values != trainer.sort(dim=-1).values).any(dim=-1)


def routing_mismatch(engine, trainer) -> RoutingMismatch:
    """The mismatch between two routings of the same N tokens ([N, layers, top_k] each)."""
    differ = differing_routes(engine, trainer)
    return RoutingMismatch(differ.sum(dim=0), int(differ.any(dim=1).sum()), differ.shape[0])


# --------------------------------------------------------------------------- trainer side


class _Recorder:
    """Stands in for Megatron's `RouterReplay` on one router: computes the top-k as usual
    (`RouterReplayAction.RECORD`) and keeps every forward's indices, not just the last."""

    def __init__(self, forwards: list[torch.Tensor]):
        self.forwards = forwards

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, indices = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        self.keep(indices, scores.shape[-1])
        return probs, indices

    def keep(self, indices: torch.Tensor, num_experts: int) -> None:
        """Stored compactly, on the router's device (uint8 up to 256 experts, as vLLM's)."""
        self.forwards.append(indices.detach().to(torch.uint8 if num_experts <= 256 else torch.int32))


class _Replayer(_Recorder):
    """Megatron's `RouterReplayAction.REPLAY_FORWARD` for some tokens only: the router's own
    top-k, with the target rows' experts replaced; keeps what it routed, as `_Recorder`."""

    def __init__(self, forwards: list[torch.Tensor], targets: list[tuple[torch.Tensor, torch.Tensor]], slot: int):
        super().__init__(forwards)
        self.targets, self.slot = targets, slot

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        _, indices = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        call = len(self.forwards)
        if call >= len(self.targets):
            raise RuntimeError(f"routing replay: router call {call + 1}, but targets for {len(self.targets)} forwards "
                               "(activation recomputation calls the router again in the backward)")
        rows, ids = self.targets[call]
        if rows.numel():
            indices = indices.clone()
            indices[rows.to(indices.device)] = ids[:, self.slot].to(indices.device, indices.dtype)
        self.keep(indices, scores.shape[-1])
        return scores.gather(1, indices), indices


@dataclass
class RoutingRecord:
    """What `recorded_routing` saw: per MoE layer of this rank's model (global layer
    indices in `layers`), each forward's top-k indices [s · b, top_k] in the router's token
    order (Megatron's [s, b] flattened; under sequence parallelism this TP rank's s / TP)."""

    layers: list[int]
    forwards: list[list[torch.Tensor]]  # [layer][forward]

    def take(self) -> list[list[torch.Tensor]]:
        """[forward][layer] tensors recorded so far, in forward order; clears the record."""
        counts = {len(f) for f in self.forwards}
        if len(counts) > 1:
            raise RuntimeError(f"MoE layers recorded different numbers of forwards: {sorted(counts)}")
        taken = [list(step) for step in zip(*self.forwards)]
        for forwards in self.forwards:
            forwards.clear()
        return taken


@contextmanager
def recorded_routing(model: torch.nn.Module | Sequence[torch.nn.Module]) -> Iterator[RoutingRecord]:
    """Record every Megatron MoE router's top-k choice of every forward inside the block
    (the routing itself is unchanged). The routers' own replay objects, if any, are put
    back on exit."""
    with _hooked_routers(model, None) as record:
        yield record


@contextmanager
def replayed_routing(model: torch.nn.Module | Sequence[torch.nn.Module],
                     targets: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[RoutingRecord]:
    """Route forward i inside the block with `targets[i]` = (rows, ids) from `replay_targets`
    (this rank's layers, in `RoutingRecord.layers` order); the record holds what was routed."""
    with _hooked_routers(model, targets) as record:
        yield record


@contextmanager
def _hooked_routers(model, targets) -> Iterator[RoutingRecord]:
    from megatron.core.transformer.moe.router import TopKRouter

    modules = list(model) if isinstance(model, (list, tuple)) else [model]
    routers = [m for module in modules for m in module.modules() if isinstance(m, TopKRouter)]
    record = RoutingRecord([], [])
    saved = []
    for slot, router in enumerate(routers):
        number = getattr(router, "layer_number", None)  # global, 1-based (set by its transformer layer)
        record.layers.append(number - 1 if number is not None else slot)
        record.forwards.append([])
        saved.append(router.router_replay)
        forwards = record.forwards[-1]
        router.router_replay = _Recorder(forwards) if targets is None else _Replayer(forwards, targets, slot)
    try:
        yield record
    finally:
        for router, replay in zip(routers, saved):
            router.router_replay = replay


def replay_targets(engine: torch.Tensor, response_mask: torch.Tensor, layers: Sequence[int], *,
                   sequence_parallel: tuple[int, int] = (1, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward's replay target: (rows of the router's [s · b] token order, expert ids
    [rows, len(layers), top_k]) from the engine's ids of the micro-batch's response tokens
    (`engine_routing`, [N, all MoE layers, top_k]) and the model input's `response_mask`
    [b, s]. sequence_parallel: (TP size, TP rank) when the router sees this rank's s / TP."""
    b, s = response_mask.shape
    row, position = response_mask.bool().cpu().nonzero(as_tuple=True)  # (row, position) order, as `engine`
    rows, ids = position * b + row, _as_tensor(engine)[:, list(layers)]
    size, rank = sequence_parallel
    if size > 1:
        chunk = s // size * b
        keep = (rows >= rank * chunk) & (rows < (rank + 1) * chunk)
        rows, ids = rows[keep] - rank * chunk, ids[keep]
    return rows, ids


def response_routing(forward: list[torch.Tensor], response_mask: torch.Tensor,
                     sequence_parallel_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[N, layers, top_k]: one forward's recorded routing (`RoutingRecord.take()[m]`) at the
    positions of `response_mask` ([b, s], as given to the model: padded rows or one packed
    row), in (row, position) order — the order of the micro-batch's targets.

    sequence_parallel_group: the TP group when sequence parallelism splits the router's
    input over TP ranks (None otherwise); the ranks' pieces are gathered first."""
    b, s = response_mask.shape
    layers = []
    for indices in forward:
        if sequence_parallel_group is not None:
            parts = [torch.empty_like(indices) for _ in range(dist.get_world_size(sequence_parallel_group))]
            dist.all_gather(parts, indices.contiguous(), group=sequence_parallel_group)
            indices = torch.cat(parts)
        if indices.shape[0] != s * b:
            raise ValueError(f"recorded routing has {indices.shape[0]} tokens, the response mask [b, s] = [{b}, {s}]")
        layers.append(indices.reshape(s, b, -1).transpose(0, 1)[response_mask.bool().to(indices.device)])
    return torch.stack(layers, dim=1).cpu()


def engine_routing(routed: Sequence, sample_ids: torch.Tensor) -> torch.Tensor:
    """[N, layers, top_k]: the engines' expert ids for a micro-batch's tokens. `routed[i]`
    is sample i's `rollout_routed_experts` ([response length, layers, top_k]);
    `sample_ids` [N] the sample of each token (a sample's tokens come in response order)."""
    cursor: dict[int, int] = {}
    rows = []
    samples, counts = torch.unique_consecutive(sample_ids.cpu(), return_counts=True)
    for sample, count in zip(samples.tolist(), counts.tolist()):
        start = cursor.get(sample, 0)
        ids = _as_tensor(routed[sample])
        if start + count > ids.shape[0]:
            raise ValueError(f"sample {sample}: {start + count} response tokens, the engine routed {ids.shape[0]}")
        rows.append(ids[start:start + count])
        cursor[sample] = start + count
    return torch.cat(rows)


class RoutingMismatchMeter:
    """Engine-vs-trainer routing mismatch over a step, across micro-batches and ranks.

    Every rank that ran the forward calls `add` per micro-batch (its pipeline stage's
    layers) and then `reduce`; TP ranks other than 0 hold the same routing and are not
    counted, and the pipeline stages of one micro-batch combine their layers for the
    "any layer" count."""

    def __init__(self, num_layers: int):
        self.differing = torch.zeros(num_layers, dtype=torch.float64)
        self.tokens = torch.zeros(num_layers, dtype=torch.float64)
        self.token_flags: list[torch.Tensor] = []  # per micro-batch [N]: differs at one of this stage's layers

    def add(self, engine: torch.Tensor, trainer: torch.Tensor, layers: Sequence[int]) -> None:
        """engine: [N, all MoE layers, top_k]; trainer: [N, len(layers), top_k] for the global
        MoE layer indices `layers` (a pipeline stage's)."""
        differ = differing_routes(_as_tensor(engine)[:, list(layers)], trainer)
        self.differing[list(layers)] += differ.sum(dim=0).double()
        self.tokens[list(layers)] += differ.shape[0]
        self.token_flags.append(differ.any(dim=1))

    def add_micro_batch(self, forward: list[torch.Tensor], response_mask: torch.Tensor, routed: Sequence,
                        sample_ids: torch.Tensor, layers: Sequence[int],
                        sequence_parallel_group: dist.ProcessGroup | None = None) -> None:
        """One micro-batch of a recorded pass: `forward` its `RoutingRecord.take()` entry, the
        response mask of the model input it ran (padded or packed), `routed` every sample's
        `rollout_routed_experts` (the step batch's order), `sample_ids` the micro-batch's."""
        trainer = response_routing(forward, response_mask, sequence_parallel_group)
        self.add(engine_routing(routed, sample_ids), trainer, layers)

    def reduce(self, *, tp_rank: int, is_last_stage: bool, pp_group: dist.ProcessGroup | None = None,
               group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Metrics over every rank of `group` (None: the default group), which all call it."""
        flags = torch.cat(self.token_flags).float() if self.token_flags else torch.zeros(0)
        if pp_group is not None and dist.get_world_size(pp_group) > 1:
            flags = flags.to(_collective_device(pp_group))
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=pp_group)
        counted = tp_rank == 0
        last = counted and is_last_stage
        sums = torch.cat([self.differing * counted, self.tokens * counted,
                          torch.tensor([flags.sum().item() * last, flags.numel() * last], dtype=torch.float64)])
        if dist.is_initialized():
            sums = sums.to(_collective_device(group))
            dist.all_reduce(sums, group=group)
            sums = sums.cpu()
        layers = self.differing.numel()
        differing, tokens, (any_layer, total) = sums[:layers], sums[layers:2 * layers], sums[2 * layers:].tolist()
        per_layer = differing / tokens.clamp_min(1.0)
        return {
            "routing/mismatch": (differing.sum() / tokens.sum().clamp_min(1.0)).item(),
            "routing/mismatch_any_layer": any_layer / max(total, 1.0),
            "routing/mismatch_max_layer": per_layer.max().item() if layers else 0.0,
        }


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a collective of `group` takes its tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
