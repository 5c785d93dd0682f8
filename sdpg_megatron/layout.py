"""Dry-run launch planner: parallel layout, batch split and per-GPU memory, without GPUs.

`plan_layout` checks everything a launch can get wrong before it queues for GPUs — the
world size against TP × PP, TP against the model's heads, query groups, FFN width and
padded vocabulary, PP against the layer count, EP and ETP against the experts and each
stage's TP × DP ranks, each PPO mini-batch against the
data-parallel size (exactly `experience.minibatch_sample_ids`' rule), the rollout fleet
against its GPUs and vLLM's head rules — and raises `ValueError` naming the field or flag
and the fix. It then estimates the bytes every trainer GPU holds at its peak and refuses a
layout that does not fit (unless `allow_overflow=True`).

The estimate is `memory_model`'s (its module docstring has the formulas): per trainer GPU
of each pipeline stage, weights, gradients, optimizer state, π_ref, activations, teacher
states, loss buffers and overhead, with a mixture-of-experts model's experts in rows of
their own. Transient buffers are left to the margin: a layout fits when its largest stage
needs at most 90% of the GPU. The rollout side is checked against vLLM's own rules (heads
divisible by the engine TP; KV heads divisible by it, or it by them) and, given
`rollout_gpus`, for weights and a KV cache that holds at least one full-length sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sdpg_megatron.config import Config, validate
from sdpg_megatron.experience import padded_length
from sdpg_megatron.memory_model import (
    ENGINE_RUNTIME_BYTES, EXPERT_ITEMS, GIB, MemoryEstimate, RolloutEstimate, expert_stage_parameters,
    rollout_estimate, stage_memory, stage_parameters,
)
from sdpg_megatron.model.provider import (
    check_layout, check_recompute, check_sequence_parallel, divisors, resolve_padded_vocab,
)
from sdpg_megatron.model.qwen3 import Qwen3Arch

FIT_FRACTION = 0.9  # a layout fits when its largest stage needs at most this share of the GPU


@dataclass(frozen=True, kw_only=True)
class Layout:
    """A checked launch: who holds what, the batch split and the memory per GPU."""

    arch: Qwen3Arch
    world_size: int
    gpus_per_node: int | None
    tp: int
    pp: int
    dp: int
    ep: int  # expert parallel (1 for dense models)
    etp: int  # expert tensor parallel
    expert_dp: int  # expert data parallel: TP × DP / (EP × ETP)
    layers_per_stage: int
    heads_per_rank: int
    query_groups_per_rank: int
    padded_vocab: int
    vocab_shard: int
    params_per_stage: tuple[int, ...]  # all of a GPU's parameters, experts included
    expert_params_per_rank: int  # of which experts (the same on every stage)
    params_dtype: str
    sequence_length: int
    max_prompt_tokens: int
    max_response_tokens: int
    prompts_per_step: int
    group_size: int
    minibatches_per_step: int
    micro_batch_size: int
    sequence_parallel: bool
    recompute: str  # activation recomputation of the training pass, in words
    memory_per_stage: tuple[MemoryEstimate, ...]
    gpu_memory_bytes: int
    rollout: RolloutEstimate
    rollout_gpus: int | None

    @property
    def params_per_rank(self) -> int:
        """Parameters on the GPU of the largest stage."""
        return max(self.params_per_stage)

    @property
    def experts_per_rank(self) -> int:
        return self.arch.num_experts // self.ep

    @property
    def samples_per_minibatch(self) -> int:
        return self.prompts_per_step // self.minibatches_per_step * self.group_size

    @property
    def samples_per_rank(self) -> int:
        """Samples one data-parallel rank gets per PPO mini-batch."""
        return self.samples_per_minibatch // self.dp

    @property
    def micro_batches_per_minibatch(self) -> int:
        return -(-self.samples_per_rank // self.micro_batch_size)

    @property
    def memory(self) -> MemoryEstimate:
        """The stage that needs the most memory."""
        return max(self.memory_per_stage, key=lambda estimate: estimate.total)

    @property
    def budget_bytes(self) -> int:
        return int(FIT_FRACTION * self.gpu_memory_bytes)

    @property
    def trainer_fits(self) -> bool:
        return self.memory.total <= self.budget_bytes

    @property
    def rollout_fits(self) -> bool:
        """Only judged when the rollout GPUs were given (the engines may run on CPUs)."""
        if self.rollout_gpus is None:
            return True
        return _rollout_problem(self.rollout) is None

    @property
    def fits(self) -> bool:
        return self.trainer_fits and self.rollout_fits

    def describe(self) -> str:
        """The dry run's table: layout, batch, memory per GPU, rollout."""
        a, m = self.arch, self.memory
        nodes = ""
        if self.gpus_per_node and self.world_size <= self.gpus_per_node:
            nodes = f" (one node of {self.gpus_per_node})"
        elif self.gpus_per_node:
            nodes = f" ({self.world_size // self.gpus_per_node} nodes × {self.gpus_per_node})"
        if a.is_moe:
            model = (f"Qwen3-MoE {_count(a.num_parameters())} ({_count(a.active_parameters())} active): "
                     f"{a.num_layers} layers, hidden {a.hidden_size}, {a.num_attention_heads} heads / "
                     f"{a.num_query_groups} KV heads, {a.num_experts} experts of FFN {a.moe_ffn_hidden_size}, "
                     f"top-{a.experts_per_token}")
            experts = (f", EP {self.ep} × ETP {self.etp} ({self.experts_per_rank} experts per rank, "
                       f"expert DP {self.expert_dp})")
            split = (f" = {_count(self.params_per_rank - self.expert_params_per_rank)} non-expert + "
                     f"{_count(self.expert_params_per_rank)} expert")
        else:
            model = (f"Qwen3 {_count(a.num_parameters())}: {a.num_layers} layers, hidden {a.hidden_size}, "
                     f"{a.num_attention_heads} heads / {a.num_query_groups} KV heads, FFN {a.ffn_hidden_size}")
            experts = split = ""
        lines = [
            f"model      {model}, {'tied' if a.tied_embeddings else 'untied'} embeddings, {self.params_dtype} params",
            f"trainer    {self.world_size} GPUs{nodes}: TP {self.tp} × PP {self.pp} × DP {self.dp}{experts}"
            + (", sequence parallel" if self.sequence_parallel else ""),
            f"  stages     {self.layers_per_stage} layers per stage; per TP rank {self.heads_per_rank} heads, "
            f"{self.query_groups_per_rank} KV heads",
            f"  vocabulary {a.vocab_size:,} padded to {self.padded_vocab:,}; {self.vocab_shard:,} rows per TP rank",
            f"  parameters {_count(self.params_per_rank)} per GPU (largest stage){split}"
            + (f"; per stage {', '.join(_count(p) for p in self.params_per_stage)}" if self.pp > 1 else ""),
            f"  sequence   {self.sequence_length:,} tokens = {self.max_prompt_tokens:,} prompt + "
            f"{self.max_response_tokens:,} response (student and teacher views alike: the teacher "
            "prompt, privileged context included, is held to data.max_prompt_tokens too)",
            f"batch      {self.prompts_per_step} prompts × G {self.group_size} = "
            f"{self.prompts_per_step * self.group_size} samples per step in {self.minibatches_per_step} "
            f"mini-batches of {self.samples_per_minibatch}",
            f"  per DP rank {self.samples_per_rank} samples per mini-batch = {self.micro_batches_per_minibatch} "
            f"micro-batches of {self.micro_batch_size}; activation recomputation: {self.recompute}",
        ]
        # the first stage holds the most activations, the last the teacher states and the
        # loss; stages between hold less than the first
        shown = [self.memory_per_stage[0]] + ([self.memory_per_stage[-1]] if self.pp > 1 else [])
        rows = [(index, name) for index, (name, _) in enumerate(m.items())
                if a.is_moe or name not in EXPERT_ITEMS]  # a dense model has no expert rows
        width = max(22, *(len(name) for _, name in rows))
        lines.append(f"{'memory     per GPU, GiB':<{width + 3}}" + "".join(f"{f'stage {e.stage}':>10}" for e in shown))
        for index, name in rows:
            lines.append(f"  {name:<{width}}" + "".join(f"{e.items()[index][1] / GIB:>10.2f}" for e in shown))
        verdict = "fits" if self.trainer_fits else "DOES NOT FIT"
        lines.append(
            f"  {'total':<{width}}" + "".join(f"{e.total / GIB:>10.2f}" for e in shown)
            + f"   of {self.budget_bytes / GIB:.1f} ({FIT_FRACTION:.0%} of {self.gpu_memory_bytes / GIB:.0f}): "
            f"{verdict}"
        )
        r = self.rollout
        of = f" (of {self.rollout_gpus})" if self.rollout_gpus is not None else ""
        lines.append(
            f"rollout    {r.num_engines} engine(s) × TP {r.engine_tensor_parallel} = {r.num_gpus} GPUs{of}, "
            f"{r.dtype}: {r.weights_per_gpu / GIB:.2f} GiB weights and {r.kv_cache_per_gpu / GIB:.2f} GiB KV cache "
            f"per GPU = {r.full_length_sequences} sequences of {r.max_model_len:,} tokens per engine"
        )
        if self.rollout_gpus is not None and not self.rollout_fits:
            lines.append(f"  DOES NOT FIT: {_rollout_problem(r)}")
        return "\n".join(lines)


def plan_layout(
    config: Config,
    arch: Qwen3Arch,
    *,
    world_size: int,
    gpus_per_node: int | None = None,
    gpu_memory_gib: float = 80.0,
    rollout_gpus: int | None = None,
    padded_vocab: int | None = None,
    allow_overflow: bool = False,
) -> Layout:
    """Check a launch of `config` on `world_size` trainer GPUs and estimate its memory.

    Args:
        world_size: trainer ranks (torchrun's world; the rollout GPUs are separate).
        gpus_per_node: GPUs per trainer node; TP groups must stay inside one.
        gpu_memory_gib: memory of one GPU (trainer and rollout alike).
        rollout_gpus: GPUs the vLLM fleet may use; None skips the fleet's GPU checks
            (CPU engines, or a submission that does not know yet).
        padded_vocab: the padded vocabulary a converted checkpoint was written with;
            None: Megatron's padding for this TP size.
        allow_overflow: return a layout that does not fit (`fits` False) instead of raising.

    Raises:
        ValueError naming the config field or flag and the fix.
    """
    validate(config)
    par, sched = config.parallel, config.schedule
    tp, pp, ep, etp = par.tensor_parallel, par.pipeline_parallel, par.expert_parallel, par.expert_tensor_parallel
    _check_world(world_size, tp, pp, gpus_per_node)
    # Megatron's own requirements (and EP / ETP only for mixture-of-experts models)
    check_layout(arch, tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep, expert_tensor_parallel=etp)
    check_recompute(arch, pipeline_parallel=pp, granularity=par.recompute_granularity, method=par.recompute_method,
                    num_layers=par.recompute_num_layers)
    check_sequence_parallel(tensor_parallel=tp, sequence_parallel=par.sequence_parallel)
    padded = resolve_padded_vocab(arch, tp, padded_vocab)
    dp = world_size // (tp * pp)
    _check_experts(arch, world_size=world_size, tp=tp, pp=pp, dp=dp, ep=ep, etp=etp,
                   sequence_parallel=par.sequence_parallel)
    expert_dp = tp * dp // (ep * etp)
    _check_batch(config, dp, pp)
    _check_rollout_split(config, arch, gpus_per_node, rollout_gpus)
    sequence_length = padded_length(config.data.max_prompt_tokens + config.rollout.max_response_tokens)
    if sequence_length > arch.max_position_embeddings:
        raise ValueError(
            f"config fields data.max_prompt_tokens + rollout.max_response_tokens: {sequence_length} tokens exceed "
            f"the model's max_position_embeddings={arch.max_position_embeddings}; shorten them"
        )

    params = stage_parameters(arch, tp=tp, pp=pp, padded_vocab=padded, ep=ep, etp=etp)
    expert_params = expert_stage_parameters(arch, pp=pp, ep=ep, etp=etp)
    memory = tuple(
        stage_memory(config, arch, stage=i, params=p, expert_params=expert_params, dp=dp, expert_dp=expert_dp,
                      padded_vocab=padded, sequence_length=sequence_length)
        for i, p in enumerate(params)
    )
    gpu_memory_bytes = int(gpu_memory_gib * GIB)
    layout = Layout(
        arch=arch, world_size=world_size, gpus_per_node=gpus_per_node, tp=tp, pp=pp, dp=dp, ep=ep, etp=etp,
        expert_dp=expert_dp, layers_per_stage=arch.num_layers // pp, heads_per_rank=arch.num_attention_heads // tp,
        query_groups_per_rank=arch.num_query_groups // tp, padded_vocab=padded, vocab_shard=padded // tp,
        params_per_stage=params, expert_params_per_rank=expert_params, params_dtype=config.model.params_dtype,
        sequence_length=sequence_length,
        max_prompt_tokens=config.data.max_prompt_tokens, max_response_tokens=config.rollout.max_response_tokens,
        prompts_per_step=sched.prompts_per_step, group_size=config.algorithm.group_size,
        minibatches_per_step=sched.minibatches_per_step, micro_batch_size=sched.micro_batch_size,
        sequence_parallel=par.sequence_parallel, recompute=_describe_recompute(par),
        memory_per_stage=memory, gpu_memory_bytes=gpu_memory_bytes,
        rollout=rollout_estimate(config, arch, gpu_memory_bytes, sequence_length), rollout_gpus=rollout_gpus,
    )
    if not allow_overflow:
        _raise_unless_fits(layout, config)
    return layout


def _describe_recompute(parallel) -> str:
    if parallel.recompute_granularity == "none":
        return "none"
    if parallel.recompute_granularity == "selective":
        return "selective (core attention)"
    k = parallel.recompute_num_layers
    if parallel.recompute_method == "uniform":
        return f"full, uniform units of {k} layer{'s' if k > 1 else ''}"
    return f"full, the first {k} layer{'s' if k > 1 else ''} of each stage"


# --------------------------------------------------------------------------- checks


def _check_world(world_size: int, tp: int, pp: int, gpus_per_node: int | None) -> None:
    if world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {world_size}")
    if world_size % (tp * pp):
        raise ValueError(
            f"--world-size {world_size} is not divisible by parallel.tensor_parallel × parallel.pipeline_parallel "
            f"= {tp} × {pp}; use a multiple of {tp * pp} trainer GPUs or change TP/PP"
        )
    if gpus_per_node is None:
        return
    if gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node must be >= 1, got {gpus_per_node}")
    if tp > gpus_per_node:
        raise ValueError(
            f"config field parallel.tensor_parallel: {tp} exceeds --gpus-per-node {gpus_per_node}; tensor "
            "parallelism all-reduces inside every layer and must stay inside a node: use TP <= "
            f"{gpus_per_node} and raise parallel.pipeline_parallel instead"
        )
    if world_size > gpus_per_node and (world_size % gpus_per_node or gpus_per_node % tp):
        raise ValueError(
            f"--world-size {world_size} over nodes of --gpus-per-node {gpus_per_node}: use whole nodes, and a "
            f"parallel.tensor_parallel that divides {gpus_per_node} (got {tp}) so no TP group spans two nodes"
        )


def _check_experts(arch: Qwen3Arch, *, world_size: int, tp: int, pp: int, dp: int, ep: int, etp: int,
                   sequence_parallel: bool) -> None:
    """Megatron's expert layout (EP × ETP regroups each stage's TP × DP ranks) and its MoE
    layer's refusal of TP > 1 without sequence parallelism; `check_layout` has already
    refused EP / ETP > 1 for a dense model and EP / ETP that do not divide the experts."""
    if not arch.is_moe:
        return
    per_stage = tp * dp
    if per_stage % (ep * etp):
        # (at EP 1 check_layout wants ETP = TP)
        valid = [n for n in divisors(arch.num_experts) if per_stage % (n * etp) == 0 and (n > 1 or etp == tp)]
        choices = f"choose parallel.expert_parallel (--ep) from {valid} or " if valid else ""
        raise ValueError(
            f"config fields parallel.expert_parallel × parallel.expert_tensor_parallel = {ep} × {etp} must divide "
            f"the TP × DP = {tp} × {dp} = {per_stage} ranks of each pipeline stage (Megatron regroups them as expert "
            f"TP × EP × expert DP): at --world-size {world_size} {choices}use a world size that is a multiple "
            f"of {pp * math.lcm(tp, ep * etp)}"
        )
    if tp > 1 and not sequence_parallel:
        raise ValueError(
            f"config field parallel.sequence_parallel: a mixture-of-experts model trains at tensor parallel size {tp} "
            "only with sequence parallelism (Megatron's MoE layer refuses TP > 1 without it): set "
            "parallel.sequence_parallel=true"
        )


def _check_batch(config: Config, dp: int, pp: int) -> None:
    """`experience.minibatch_sample_ids`' rule, and micro-batches that fit a DP slice."""
    sched, group_size = config.schedule, config.algorithm.group_size
    # validate() already checked prompts_per_step % minibatches_per_step (the first rule)
    per_minibatch = sched.prompts_per_step // sched.minibatches_per_step * group_size
    if per_minibatch % dp:
        raise ValueError(
            f"config fields schedule.prompts_per_step / schedule.minibatches_per_step × algorithm.group_size: a "
            f"mini-batch of {sched.prompts_per_step} / {sched.minibatches_per_step} × {group_size} = {per_minibatch} "
            f"responses cannot be split over {dp} data-parallel ranks; make it divisible by the DP size "
            "(--world-size / (TP × PP)) or change the world size"
        )
    per_rank = per_minibatch // dp
    # Without PP a micro-batch larger than the slice is simply the whole slice.
    if pp > 1 and per_rank % sched.micro_batch_size:
        raise ValueError(
            f"config field schedule.micro_batch_size: {sched.micro_batch_size} does not divide the {per_rank} "
            "samples per data-parallel rank and mini-batch; with pipeline parallelism every micro-batch must "
            f"have the same shape: choose one of {divisors(per_rank)}"
        )


def _check_rollout_split(config: Config, arch: Qwen3Arch, gpus_per_node: int | None, rollout_gpus: int | None) -> None:
    r = config.rollout
    etp = r.engine_tensor_parallel
    heads, kv_heads = arch.num_attention_heads, arch.num_query_groups
    if heads % etp:
        raise ValueError(
            f"config field rollout.engine_tensor_parallel: {etp} does not divide the model's "
            f"num_attention_heads={heads} (vLLM's rule); choose one of {divisors(heads)}"
        )
    # vLLM splits the KV heads over the engine TP, or replicates them when TP exceeds them
    if (kv_heads >= etp and kv_heads % etp) or (kv_heads < etp and etp % kv_heads):
        raise ValueError(
            f"config field rollout.engine_tensor_parallel: {etp} and the model's num_query_groups={kv_heads} "
            "(KV heads) must divide one another (vLLM's rule)"
        )
    if gpus_per_node is not None and etp > gpus_per_node:
        raise ValueError(
            f"config field rollout.engine_tensor_parallel: {etp} exceeds --gpus-per-node {gpus_per_node}; an "
            "engine is one Ray placement bundle and must fit on one node"
        )
    if rollout_gpus is None:
        return
    if r.num_engines * etp > rollout_gpus:
        raise ValueError(
            f"config fields rollout.num_engines × rollout.engine_tensor_parallel = {r.num_engines} × {etp} GPUs "
            f"exceed --rollout-gpus {rollout_gpus}; use fewer engines or a smaller engine TP"
        )
    if r.gpus_per_engine != etp:
        raise ValueError(
            f"config field rollout.gpus_per_engine: {r.gpus_per_engine} but the engines run on GPUs "
            f"(--rollout-gpus {rollout_gpus}); set it to rollout.engine_tensor_parallel={etp}"
        )


# --------------------------------------------------------------------------- fit


def _rollout_problem(r: RolloutEstimate) -> str | None:
    """Why the engines would not start on these GPUs, or None."""
    needed = r.weights_per_gpu + ENGINE_RUNTIME_BYTES + (r.kv_cache_per_gpu if r.explicit_kv_cache else 0)
    if needed > r.budget_per_gpu:
        share = "the GPU" if r.explicit_kv_cache else "rollout.gpu_memory_utilization of the GPU"
        return (f"rollout.engine_tensor_parallel: {r.weights_per_gpu / GIB:.1f} GiB of {r.dtype} weights per GPU "
                f"(+ {ENGINE_RUNTIME_BYTES / GIB:.0f} GiB runtime"
                + (f" + {r.kv_cache_per_gpu / GIB:.1f} GiB rollout.kv_cache_bytes" if r.explicit_kv_cache else "")
                + f") exceed {share} ({r.budget_per_gpu / GIB:.1f} GiB); raise the engine TP, use "
                "rollout.dtype=bfloat16 or raise rollout.gpu_memory_utilization")
    if r.full_length_sequences < 1:
        return (f"rollout.kv_cache_bytes / rollout.gpu_memory_utilization: a KV cache of "
                f"{max(0, r.kv_cache_per_gpu) / GIB:.2f} GiB per GPU holds no sequence of max_model_len="
                f"{r.max_model_len} ({r.kv_bytes_per_token * r.max_model_len / GIB:.2f} GiB) and vLLM will refuse "
                "to start; on GPUs set rollout.kv_cache_bytes=None and gpu_memory_utilization≈0.85, raise the "
                "engine TP, or use rollout.dtype=bfloat16")
    return None


_ADVICE = {
    "weights": "raise parallel.tensor_parallel or parallel.pipeline_parallel",
    "gradients": "raise parallel.tensor_parallel or parallel.pipeline_parallel",
    "reference_weights": "raise parallel.tensor_parallel or parallel.pipeline_parallel",
    "optimizer_state": "add data-parallel ranks (a larger --world-size) with optimizer.use_distributed_optimizer=true, "
                       "or raise parallel.tensor_parallel / parallel.pipeline_parallel",
    "activations": "set parallel.recompute_granularity=full, lower schedule.micro_batch_size (activations grow "
                   "with it) or raise parallel.tensor_parallel (PP does not help: the first 1F1B stage holds pp "
                   "micro-batches of layers/pp layers)",
    "teacher_states": "add data-parallel ranks (a larger --world-size) or raise schedule.minibatches_per_step",
    "loss_buffers": "raise parallel.tensor_parallel",
    "overhead": "use GPUs with more memory",
    **dict.fromkeys(("expert_weights", "expert_gradients", "expert_reference_weights"),
                    "raise parallel.expert_parallel (each GPU holds num_experts / EP experts of every layer of its "
                    "stage) or parallel.pipeline_parallel"),
    "expert_optimizer_state": "add trainer GPUs (a larger --world-size) with "
                              "optimizer.use_distributed_optimizer=true: it spreads the experts' Adam state over "
                              "all TP × DP ranks of a stage, whatever EP × ETP",
}


def _raise_unless_fits(layout: Layout, config: Config) -> None:
    m = layout.memory
    if not layout.trainer_fits:
        name, value = m.largest
        experts = f", EP {layout.ep} × ETP {layout.etp}" if layout.arch.is_moe else ""
        dtype_hint = "" if config.model.params_dtype == "bfloat16" else "; set model.params_dtype=bfloat16 first"
        raise ValueError(
            f"the trainer does not fit: stage {m.stage} needs {m.total / GIB:.1f} GiB per GPU at TP {layout.tp} × "
            f"PP {layout.pp} × DP {layout.dp}{experts} (budget {layout.budget_bytes / GIB:.1f} GiB = "
            f"{FIT_FRACTION:.0%} of {layout.gpu_memory_bytes / GIB:.0f}); the largest item is {name} "
            f"({value / GIB:.1f} GiB): {_ADVICE[name]}{dtype_hint}. Pass allow_overflow to plan anyway.\n"
            f"{layout.describe()}"
        )
    if not layout.rollout_fits:
        problem = _rollout_problem(layout.rollout)
        raise ValueError(f"the rollout fleet does not fit: config field {problem}")


def _count(num_parameters: int) -> str:
    return f"{num_parameters / 1e9:.3f}B" if num_parameters >= 1e8 else f"{num_parameters / 1e6:.2f}M"
