"""Trainer side of the weight push: Megatron shards → Hugging Face tensors → buckets.

After each optimizer step every pipeline stage gathers its tensor-parallel shards, renames
them through the one HF ↔ Megatron table (`model/hf_mapping.py`) and packs them into
buckets of at most `bucket_bytes` (a single larger tensor gets a bucket of its own).
Stages other than the first send their buckets point-to-point to the driver (global
rank 0, first stage, TP rank 0, DP rank 0), which hands each bucket to the rollout fleet
as it arrives; so a trainer rank holds at most one bucket plus one gathered tensor.

`allocate(numel, dtype)`, when given, is where the driver's buckets are written: the
fleet's reusable same-host buffers (`shared_memory.py`), so each byte is written once into
memory the engines read in place.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from sdpg_megatron.model.hf_mapping import find_rule, global_name, layer_offset, tp_gather, to_hf
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
    if groups.dp_rank != 0:
        return  # data-parallel replicas hold identical weights: one replica pushes
    is_driver = groups.pp_rank == 0 and groups.tp_rank == 0
    for stage in range(groups.pp_size):
        if stage == groups.pp_rank:
            local = pack_buckets(_stage_hf_tensors(model, arch, groups, dtype), bucket_bytes,
                                 allocate if is_driver else None)
            if is_driver:
                yield from local
            else:
                for bucket in local:
                    if groups.tp_rank == 0:
                        _send_bucket(bucket, groups.pp_group)
                if groups.tp_rank == 0:
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
    """This stage's HF tensors (on TP rank 0; other TP ranks only take part in the gathers)."""
    offset = layer_offset(arch.num_layers, groups.pp_size, groups.pp_rank)
    for local_name, param in model.named_parameters():
        name = global_name(local_name, offset)
        if name == "output_layer.weight" and arch.tied_embeddings:
            continue  # the last stage's copy of the tied embedding
        hf_names, kind = find_rule(arch, name)
        shard = param.detach() if dtype is None else param.detach().to(dtype)
        if groups.tp_size > 1:
            shards = [torch.empty_like(shard) for _ in range(groups.tp_size)]
            dist.all_gather(shards, shard.contiguous(), group=groups.tp_group)
            full = tp_gather(kind, shards)
        else:
            full = shard
        if groups.tp_rank == 0:
            yield from zip(hf_names, to_hf(kind, full, arch))


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
