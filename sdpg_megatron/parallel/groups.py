"""The one module that reads Megatron-Core's parallel state; everything else gets groups.

`initialize_parallel` sets up Megatron's process groups (and the CPU shim when CUDA is
absent) on an already initialised default process group; `current_groups()` hands the
groups and this rank's coordinates down as a plain dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sdpg_megatron.parallel.cpu_shim import apply_cpu_shim


@dataclass(frozen=True)
class ParallelGroups:
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    ep_size: int = 1  # expert parallelism (mixture-of-experts models)
    ep_rank: int = 0
    etp_size: int = 1  # expert tensor parallelism
    etp_rank: int = 0
    ep_group: dist.ProcessGroup | None = None
    etp_group: dist.ProcessGroup | None = None
    expert_dp_rank: int = 0  # which replica of this rank's experts (0 pushes them)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def loss_tp_group(self) -> dist.ProcessGroup | None:
        """The group the vocab-parallel loss reduces over (None at TP = 1)."""
        return self.tp_group if self.tp_size > 1 else None


def initialize_parallel(*, tensor_parallel: int, pipeline_parallel: int, seed: int, expert_parallel: int = 1,
                        expert_tensor_parallel: int = 1) -> ParallelGroups:
    """Megatron parallel state for this process; the default process group must exist.

    Experts are laid out as Megatron lays them out: each pipeline stage's TP × DP ranks
    are regrouped as expert-TP × EP × expert-DP, so EP × ETP must divide TP × DP."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        raise RuntimeError("initialise torch.distributed (torchrun / init_process_group) first")
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel × pipeline_parallel = "
            f"{tensor_parallel} × {pipeline_parallel}"
        )
    per_stage = world // pipeline_parallel
    if per_stage % (expert_parallel * expert_tensor_parallel):
        raise ValueError(
            f"expert_parallel × expert_tensor_parallel = {expert_parallel} × {expert_tensor_parallel} must divide the "
            f"{per_stage} ranks of each pipeline stage (world size {world} / pipeline_parallel {pipeline_parallel})"
        )
    apply_cpu_shim()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
    )
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    torch.manual_seed(seed)
    return current_groups()


def current_groups() -> ParallelGroups:
    from megatron.core import parallel_state as ps

    return ParallelGroups(
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_size=ps.get_expert_tensor_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        ep_group=ps.get_expert_model_parallel_group(),
        etp_group=ps.get_expert_tensor_parallel_group(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
