"""Megatron-Core training plumbing, the canonical way: provider → DDP → optimizer →
`get_forward_backward_func` → `finalize_model_grads` → `optimizer.step()`.

Losses follow Megatron's per-token convention (`calculate_per_token_loss=True`): a loss
function returns (Σ per-token loss, number of loss tokens, metrics), and
`finalize_model_grads` divides the gradients by the token count summed over micro-batches
and data-parallel ranks — exactly docs/method.md's token-mean over the mini-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from sdpg_megatron.config import OptimizerConfig, ParallelConfig
from sdpg_megatron.model.provider import PolicyGPTModel, model_provider, transformer_config
from sdpg_megatron.model.qwen3 import Qwen3Arch
from sdpg_megatron.parallel.groups import ParallelGroups


@dataclass
class TrainableModel:
    model: DistributedDataParallel  # one chunk (no virtual pipeline stages)
    optimizer: object  # a MegatronOptimizer
    scheduler: OptimizerParamScheduler  # LR warm-up (optimizer.lr_warmup_unit says what it counts)
    config: TransformerConfig
    lr_warmup_unit: str = "rollout_step"

    @property
    def module(self) -> PolicyGPTModel:
        return self.model.module


@dataclass
class StepResult:
    losses: list  # what the loss function reported per micro-batch (last stage only)
    grad_norm: float | None
    update_successful: bool  # False: the step was skipped (non-finite gradients)
    lr: float = 0.0  # the learning rate this update ran at
    router: dict = field(default_factory=dict)  # mixture-of-experts: `router_metrics`, on every rank


def build_policy(
    arch: Qwen3Arch,
    groups: ParallelGroups,
    settings: OptimizerConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    load_weights: Callable[[PolicyGPTModel], None] | None = None,
    parallel: ParallelConfig | None = None,
    variable_seq_lengths: bool = False,
) -> TrainableModel:
    """The trainable policy at this rank's layout; `load_weights` runs before DDP wraps
    the parameters and the optimizer copies them. `parallel`: the config section whose
    sequence_parallel and recompute_* fields apply (None: neither; TP and PP come from
    `groups`). `variable_seq_lengths`: micro-batches of different shapes (see
    `transformer_config`)."""
    config = _transformer_config(arch, groups, params_dtype, parallel, training=True,
                                 variable_seq_lengths=variable_seq_lengths)
    config.calculate_per_token_loss = True
    module = _on_device(model_provider(arch, config, pre_process=groups.is_first_stage, post_process=groups.is_last_stage))
    if load_weights is not None:
        load_weights(module)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        average_in_collective=False,
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)
    model.broadcast_params()  # data-parallel replicas start identical whatever was loaded
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam", lr=settings.lr, weight_decay=settings.weight_decay,
            adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
            clip_grad=settings.clip_grad, use_distributed_optimizer=settings.use_distributed_optimizer,
            params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=False,
        ),
        [model],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync
    # Linear warm-up from 0 to lr over lr_warmup_steps, then constant (docs/method.md).
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=settings.lr, min_lr=settings.lr,
        lr_warmup_steps=settings.lr_warmup_steps, lr_decay_steps=settings.lr_warmup_steps + 1,
        lr_decay_style="constant", start_wd=settings.weight_decay, end_wd=settings.weight_decay,
        wd_incr_steps=1, wd_incr_style="constant",
    )
    if settings.lr_warmup_unit == "optimizer_step":
        scheduler.step(increment=1)  # optimizer step j (1-based) runs at lr · min(1, j / warm-up)
    return TrainableModel(model=model, optimizer=optimizer, scheduler=scheduler, config=config,
                          lr_warmup_unit=settings.lr_warmup_unit)


def set_rollout_step(policy: TrainableModel, step: int) -> None:
    """With the warm-up counted in rollout steps (the authors' scheduler, stepped once per
    rollout step after its updates), every update of rollout step k runs at
    lr · min(1, (k − 1) / warm-up): a pure function of k, so a resumed run is exact."""
    if policy.lr_warmup_unit == "rollout_step":
        policy.scheduler.num_steps = step - 1
        policy.scheduler.step(increment=0)


def build_frozen(
    arch: Qwen3Arch,
    groups: ParallelGroups,
    *,
    params_dtype: torch.dtype = torch.float32,
    load_weights: Callable[[PolicyGPTModel], None] | None = None,
    parallel: ParallelConfig | None = None,
    variable_seq_lengths: bool = False,
) -> PolicyGPTModel:
    """A model with no gradients and no optimizer (the reference policy π_ref), with the
    policy's sequence parallelism (no recomputation: it only runs forward)."""
    config = _transformer_config(arch, groups, params_dtype, parallel, training=False,
                                 variable_seq_lengths=variable_seq_lengths)
    module = _on_device(model_provider(arch, config, pre_process=groups.is_first_stage, post_process=groups.is_last_stage))
    if load_weights is not None:
        load_weights(module)
    module.eval()
    module.requires_grad_(False)
    return module


def _transformer_config(arch, groups, params_dtype, parallel: ParallelConfig | None, *, training: bool,
                        variable_seq_lengths: bool):
    parallel = parallel or ParallelConfig()
    if training and arch.is_moe and groups.tp_size > 1 and not parallel.sequence_parallel:
        raise ValueError(
            f"a mixture-of-experts model trains at tensor parallel size {groups.tp_size} only with sequence "
            "parallelism (Megatron's MoE layer refuses TP > 1 without it): set parallel.sequence_parallel=true"
        )
    recompute = {"recompute_granularity": parallel.recompute_granularity, "recompute_method": parallel.recompute_method,
                 "recompute_num_layers": parallel.recompute_num_layers} if training else {}
    return transformer_config(
        arch, tensor_parallel=groups.tp_size, pipeline_parallel=groups.pp_size, expert_parallel=groups.ep_size,
        expert_tensor_parallel=groups.etp_size, params_dtype=params_dtype,
        sequence_parallel=parallel.sequence_parallel, variable_seq_lengths=variable_seq_lengths, **recompute,
    )


def _on_device(module: PolicyGPTModel) -> PolicyGPTModel:
    """Megatron builds linear weights on the GPU but leaves modules such as torch's norms on
    the CPU; like Megatron-LM's get_model, move the whole module to this rank's GPU."""
    if torch.cuda.is_available():
        module.cuda(torch.cuda.current_device())
    return module


def train_step(
    policy: TrainableModel,
    forward_step: Callable,
    microbatches: Iterator,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> StepResult:
    """One optimizer step over `num_microbatches` micro-batches."""
    policy.model.zero_grad_buffer()
    policy.optimizer.zero_grad()
    policy.model.train()
    lr = policy.optimizer.param_groups[0]["lr"]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=microbatches,
        model=[policy.model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    router = router_metrics(policy.config, num_microbatches)
    if not _gradients_finite(policy.model):
        # NaN/inf anywhere on any rank: nothing is applied, Adam's state is untouched.
        return StepResult(losses=losses, grad_norm=float("nan"), update_successful=False, lr=lr, router=router)
    update_successful, grad_norm, _ = policy.optimizer.step()
    if update_successful and policy.lr_warmup_unit == "optimizer_step":
        policy.scheduler.step(increment=1)
    return StepResult(losses=losses, grad_norm=grad_norm, update_successful=bool(update_successful), lr=lr,
                      router=router)


def router_metrics(config: TransformerConfig, num_microbatches: int) -> dict[str, float]:
    """A mixture-of-experts step's load-balancing loss on its own (collective; {} for dense
    models): Megatron's per-layer switch loss without its coefficient, summed over the
    step's micro-batches by the routers, gathered over pipeline stages and sequence-parallel
    shards, averaged over data-parallel ranks, then over layers and micro-batches. 1.0 is
    perfectly balanced routing. Clears Megatron's tracker for the next step.

    The term enters the objective as Megatron's per-token-loss convention puts it: each
    micro-batch's coefficient · loss is scaled by its routed tokens and the step's
    gradients are divided by its loss tokens (`finalize_model_grads`), so its weight is
    router_aux_loss_coef × routed tokens / loss tokens."""
    if not config.num_moe_experts or not config.moe_aux_loss_coeff:
        return {}
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    if "load_balancing_loss" not in tracker:
        raise RuntimeError("no router recorded a load-balancing loss in this step; were the passes in train mode?")
    reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
    values = tracker["load_balancing_loss"]["values"]
    loss = values.sum().item() / (config.num_layers * num_microbatches)
    clear_aux_losses_tracker()
    return {"moe/load_balancing_loss": loss}


def _gradients_finite(model: DistributedDataParallel) -> bool:
    """Whether every rank's reduced gradient buffers are finite (one all-reduce)."""
    bad = torch.zeros(1, dtype=torch.float32, device="cuda" if torch.cuda.is_available() else "cpu")
    for buffer in model.buffers + model.expert_parallel_buffers:
        if not torch.isfinite(buffer.grad_data).all():
            bad.fill_(1.0)
            break
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0.0


def forward_only(
    model: torch.nn.Module,
    forward_step: Callable,
    microbatches: Iterator,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> list:
    """Forward through the pipeline without gradients (teacher, reference, evaluation)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=microbatches, model=[model],
                num_microbatches=num_microbatches, seq_length=seq_length,
                micro_batch_size=micro_batch_size, forward_only=True,
            )
    finally:
        model.train(was_training)

