"""Trainer side of the weight push: Megatron shards → Hugging Face tensors → buckets.

After each optimizer step every pipeline stage gathers its tensor-parallel shards, renames
them through the one HF ↔ Megatron table (`model/hf_mapping.py`) and packs them into
buckets of at most `bucket_bytes` (a single larger tensor gets a bucket of its own).
Stages other than the first send their buckets point-to-point to the driver (global
rank 0, first stage, TP rank 0, DP rank 0), which hands each bucket to the rollout fleet
as it arrives; so a trainer rank holds at most one bucket plus one gathered tensor.

Each stage's packer is its TP rank 0 of DP rank 0. Dense tensors (everything but the
experts) are the same on every data-parallel replica: the ranks of DP rank 0 gather them
over TP, as for a dense model. A mixture-of-experts stage regroups its TP × DP ranks as
expert-TP × EP × expert-DP, so one layer's experts live on ranks of different DP ranks:
the ranks of expert-DP rank 0 take part for every expert tensor, each gathering its
expert-TP shards to expert-TP rank 0, whose expert-parallel group then gathers its copies
(local expert e of EP rank r is global expert r · E/EP + e) to EP rank 0 — the packer.
Every rank walks its parameters in the same order, so the collectives of each group come
in the same order on all of its ranks.

`allocate(numel, dtype)`, when given, is where the driver's buckets are written: the
fleet's reusable same-host buffers (`shared_memory.py`), so each byte is written once into
memory the engines read in place.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from sdpg_megatron.model.hf_mapping import find_rule, global_name, is_expert, layer_offset, tp_gather, to_hf
from sdpg_megatron.model.qwen3 import Qwen3Arch
from sdpg_megatron.parallel.groups import ParallelGroups
from sdpg_megatron.rollout.transfer import WeightBucket

Allocate = Callable[[int, torch.dtype], torch.Tensor]  # (numel, dtype) → a 1-D buffer to write a bucket into


def hf_buckets(
    model: torch.nn.Module,
    arch: Qwen3Arch,
    groups: ParallelGroups,
    *,
    bucket_bytes: int,
    dtype: torch.dtype | None = None,
    allocate: Allocate | None = None,
) -> Iterator[WeightBucket]:
    """Every rank calls this collectively; the driver gets all buckets of all stages.

    Args:
        model: this rank's bare Megatron model (not the DDP wrapper).
        bucket_bytes: target bucket size.
        dtype: the dtype the engines take (defaults to the parameters').
        allocate: the driver's bucket buffers (None: fresh tensors).
    """
    if groups.dp_rank != 0 and not (arch.is_moe and groups.expert_dp_rank == 0):
        return  # a data-parallel replica of weights that other ranks push
    packs = groups.tp_rank == 0 and groups.dp_rank == 0  # this stage's packer
    is_driver = packs and groups.pp_rank == 0
    for stage in range(groups.pp_size):
        if stage == groups.pp_rank:
            local = pack_buckets(_stage_hf_tensors(model, arch, groups, dtype), bucket_bytes,
                                 allocate if is_driver else None)
            if is_driver:
                yield from local
            else:
                for bucket in local:  # every rank: the gathers run as the packer's buckets fill
                    if packs:
                        _send_bucket(bucket, groups.pp_group)
                if packs:
                    _send_bucket(None, groups.pp_group)
        elif is_driver:
            src = dist.get_global_rank(groups.pp_group, stage)
            while (bucket := _recv_bucket(src, groups.pp_group, allocate)) is not None:
                yield bucket


def pack_buckets(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 allocate: Allocate | None = None) -> Iterator[WeightBucket]:
    """Group (name, tensor) pairs, in order, into buckets of at most `bucket_bytes` (a larger
    tensor gets a bucket of its own; a dtype change starts a new bucket)."""
    pending: list[tuple[str, torch.Tensor]] = []
    pending_bytes = 0
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if pending and (pending_bytes + size > bucket_bytes or tensor.dtype != pending[0][1].dtype):
            yield WeightBucket.pack(pending, allocate)
            pending, pending_bytes = [], 0
        pending.append((name, tensor.contiguous()))
        pending_bytes += size
    if pending:
        yield WeightBucket.pack(pending, allocate)


def _stage_hf_tensors(model, arch, groups, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's HF tensors (on its packer; the other ranks only take part in the gathers)."""
    offset = layer_offset(arch.num_layers, groups.pp_size, groups.pp_rank)
    packs = groups.tp_rank == 0 and groups.dp_rank == 0
    pushes_experts = arch.is_moe and groups.expert_dp_rank == 0
    if packs and arch.is_moe and (groups.ep_rank, groups.etp_rank, groups.expert_dp_rank) != (0, 0, 0):
        raise RuntimeError(f"weight push: the stage's packer (TP rank 0, DP rank 0) is EP rank {groups.ep_rank}, "
                           f"expert-TP rank {groups.etp_rank}, expert-DP rank {groups.expert_dp_rank}; "
                           "the expert gathers end on EP rank 0, expert-TP rank 0, expert-DP rank 0")
    experts_per_rank = arch.num_experts // groups.ep_size if arch.is_moe else 0
    for local_name, param in model.named_parameters():
        expert = arch.is_moe and is_expert(local_name)
        if (expert and not pushes_experts) or (not expert and groups.dp_rank != 0):
            continue  # experts come from expert-DP rank 0, dense tensors from DP rank 0
        shard = param.detach() if dtype is None else param.detach().to(dtype)
        if expert:
            _, kind = find_rule(arch, global_name(local_name, offset))
            shards = _gather_to_first(shard, groups.etp_size, groups.etp_group)  # expert-TP rank 0 only
            if groups.etp_rank != 0:
                continue
            copies = _gather_to_first(tp_gather(kind, shards), groups.ep_size, groups.ep_group)  # EP rank 0 only
            if packs:
                for ep_rank, full in enumerate(copies):
                    hf_names, _ = find_rule(arch, global_name(local_name, offset, ep_rank * experts_per_rank))
                    yield from zip(hf_names, to_hf(kind, full, arch))
            continue
        name = global_name(local_name, offset)
        if name == "output_layer.weight" and arch.tied_embeddings:
            continue  # the last stage's copy of the tied embedding
        hf_names, kind = find_rule(arch, name)
        if groups.tp_size > 1:
            shards = [torch.empty_like(shard) for _ in range(groups.tp_size)]
            dist.all_gather(shards, shard.contiguous(), group=groups.tp_group)
            full = tp_gather(kind, shards)
        else:
            full = shard
        if groups.tp_rank == 0:
            yield from zip(hf_names, to_hf(kind, full, arch))


def _gather_to_first(tensor: torch.Tensor, size: int, group) -> list[torch.Tensor] | None:
    """Every rank's `tensor` in group-rank order, on the group's rank 0 (None elsewhere)."""
    if size == 1:
        return [tensor]
    first = dist.get_global_rank(group, 0)
    tensor = tensor.contiguous()
    if dist.get_rank() == first:
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.gather(tensor, parts, dst=first, group=group)
        return parts
    dist.gather(tensor, None, dst=first, group=group)
    return None


def _send_bucket(bucket: WeightBucket | None, group) -> None:
    driver = dist.get_global_rank(group, 0)
    header = None if bucket is None else (bucket.names, bucket.shapes, bucket.dtype, bucket.flat.numel())
    dist.send_object_list([header], dst=driver, group=group)
    if bucket is not None:
        dist.send(bucket.flat, dst=driver, group=group)


def _recv_bucket(src: int, group, allocate: Allocate | None) -> WeightBucket | None:
    header = [None]
    dist.recv_object_list(header, src=src, group=group)
    if header[0] is None:
        return None
    names, shapes, dtype, numel = header[0]
    flat = torch.empty(numel, dtype=dtype) if allocate is None else allocate(numel, dtype)
    dist.recv(flat, src=src, group=group)
    return WeightBucket(names, shapes, dtype, flat)
