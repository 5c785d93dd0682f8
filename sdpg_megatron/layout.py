"""Dry-run launch planner: parallel layout, batch split and per-GPU memory, without GPUs.

`plan_layout` checks everything a launch can get wrong before it queues for GPUs — the
world size against TP × PP, TP against the model's heads, query groups, FFN width and
padded vocabulary, PP against the layer count, each PPO mini-batch against the
data-parallel size (exactly `experience.minibatch_sample_ids`' rule), the rollout fleet
against its GPUs and vLLM's head rules — and raises `ValueError` naming the field or flag
and the fix. It then estimates the bytes every trainer GPU holds at its peak and refuses a
layout that does not fit (unless `allow_overflow=True`).

The memory model mirrors what `model/training.py` and `passes.py` build, per GPU of
pipeline stage i with P_i parameters (its TP shard; norms replicated):

- weights          P_i · e, e = 2 B for model.params_dtype=bfloat16, 4 B for float32;
- gradients        P_i · 4 (Megatron DDP with grad_reduce_in_fp32=True);
- optimizer state  Adam m and v in fp32, plus fp32 main params when the params are bf16:
                   12 B (bf16) or 8 B (fp32) per parameter, divided by DP with the
                   distributed optimizer;
- reference        P_i · e for the frozen π_ref when the algorithm uses it;
- activations      one training micro-batch of b = micro_batch_size sequences of
                   s = max_prompt_tokens + max_response_tokens tokens; without
                   recomputation, per layer
                       e · s · b · (4h / sp + (4·a·d + 4·g·d + 5·f) / tp)
                   for a Transformer-Engine layer: the block input and normalised input
                   of both the attention and the MLP (4h, replicated over TP, or split
                   over it with parallel.sequence_parallel: sp = tp, else 1); the fused
                   QKV output, the reshaped query the q-norm saves, the roped q and k, a
                   contiguous v and the attention output (4ad + 4gd over TP); Megatron's
                   unfused SwiGLU: fc1 output (2f), SiLU output, x_linear +
                   glu_linear_offset and the product fc2 saves (5f over TP; the MLP's
                   count checked with saved-tensor hooks on CPU). This is Korthikanti et
                   al.'s 34·s·b·h count redone for GQA, an explicit head_dim and SwiGLU;
                   flash attention keeps no s² term. Flash/cuDNN attention needs 16-bit
                   inputs, so fp32 params add Korthikanti's unfused-attention term
                   5·a·s²·b/tp · e/2. Stage i of the 1F1B schedule holds
                   min(pp − i, micro-batches) micro-batches of its layers, so the first
                   stage holds the most, and PP does not shrink it (layers/pp × pp).
                   With parallel.recompute_granularity=full a unit of layers keeps only
                   its input (e·s·b·h / sp): "uniform" units of k = recompute_num_layers layers,
                   plus one unit re-materialised (k layers' count) during its backward;
                   "block" recomputes the first k layers of the stage one at a time, the
                   rest keep their count, plus one layer re-materialised. "selective"
                   (core attention) drops the unfused-attention term from every layer and
                   adds it back for the one layer being recomputed;
- teacher states   last stage: the teacher's final hidden states at the response
                   positions of the whole mini-batch slice of this DP rank,
                   samples_per_rank · max_response_tokens · h · e (held from the teacher
                   pass until the student pass ends);
- loss buffers     last stage: the fused vocab-parallel loss's three [chunk, V/tp] fp32
                   buffers (chunk as `vocab_parallel` picks it on CUDA, `chunks.chunk_tokens`
                   of its `CHUNK_BYTES`) and the micro-batch's response hidden states it
                   saves (b · r · h · e);
- overhead         a fixed 3 GiB: CUDA context, NCCL buffers, allocator fragmentation.

The activation count is that of Transformer Engine's layer spec, which the trainer builds
on GPUs with transformer-engine installed; a GPU without it gets Megatron's local spec
(unfused attention, [s, s] scores per layer), which `model.provider` logs as a warning.
Lengths are upper bounds (a step pads to its longest sequence), and transient buffers
(the backward's gradient tensors, the forward-only teacher/reference passes, weight-push
buckets) are left to the margin: a layout fits when its largest stage needs at most 90%
of the GPU. The rollout side is checked against vLLM's own rules (heads divisible by the
engine TP; KV heads divisible by it, or it by them) and, given `rollout_gpus`, for
weights and a KV cache that holds at least one full-length sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdpg_megatron.config import Config, validate
from sdpg_megatron.experience import padded_length
from sdpg_megatron.model.provider import (
    check_layout, check_recompute, check_sequence_parallel, divisors, resolve_padded_vocab,
)
from sdpg_megatron.model.qwen3 import Qwen3Arch
from sdpg_megatron.parallel.chunks import chunk_tokens
from sdpg_megatron.parallel.vocab_parallel import CHUNK_BYTES

GIB = 2**30
FIT_FRACTION = 0.9  # a layout fits when its largest stage needs at most this share of the GPU
CUDA_OVERHEAD_BYTES = 3 * GIB  # CUDA context, NCCL buffers, allocator fragmentation
ENGINE_RUNTIME_BYTES = 2 * GIB  # vLLM's activation peak and CUDA context beside weights and KV cache
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "auto": 2}


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Peak bytes on one GPU of pipeline stage `stage` (see the module docstring)."""

    stage: int
    weights: int
    gradients: int
    optimizer_state: int
    reference_weights: int
    activations: int
    teacher_states: int
    loss_buffers: int
    overhead: int

    def items(self) -> list[tuple[str, int]]:
        return [(name, getattr(self, name)) for name in (
            "weights", "gradients", "optimizer_state", "reference_weights",
            "activations", "teacher_states", "loss_buffers", "overhead",
        )]

    @property
    def total(self) -> int:
        return sum(value for _, value in self.items())

    @property
    def largest(self) -> tuple[str, int]:
        return max(self.items(), key=lambda item: item[1])


@dataclass(frozen=True, kw_only=True)
class RolloutEstimate:
    """One vLLM engine GPU: its weight shard and the KV cache left for sequences."""

    num_engines: int
    engine_tensor_parallel: int
    dtype: str
    weights_per_gpu: int
    kv_cache_per_gpu: int  # rollout.kv_cache_bytes, or what gpu_memory_utilization leaves
    kv_bytes_per_token: int  # per GPU
    max_model_len: int
    budget_per_gpu: int  # gpu_memory_utilization × GPU memory; the whole GPU with an explicit KV cache size
    explicit_kv_cache: bool

    @property
    def num_gpus(self) -> int:
        return self.num_engines * self.engine_tensor_parallel

    @property
    def full_length_sequences(self) -> int:
        """Sequences of max_model_len tokens one engine's KV cache holds at once."""
        return max(0, self.kv_cache_per_gpu) // (self.kv_bytes_per_token * self.max_model_len)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """A checked launch: who holds what, the batch split and the memory per GPU."""

    arch: Qwen3Arch
    world_size: int
    gpus_per_node: int | None
    tp: int
    pp: int
    dp: int
    layers_per_stage: int
    heads_per_rank: int
    query_groups_per_rank: int
    padded_vocab: int
    vocab_shard: int
    params_per_stage: tuple[int, ...]
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
        lines = [
            f"model      Qwen3 {_count(a.num_parameters())}: {a.num_layers} layers, hidden {a.hidden_size}, "
            f"{a.num_attention_heads} heads / {a.num_query_groups} KV heads, FFN {a.ffn_hidden_size}, "
            f"{'tied' if a.tied_embeddings else 'untied'} embeddings, {self.params_dtype} params",
            f"trainer    {self.world_size} GPUs{nodes}: TP {self.tp} × PP {self.pp} × DP {self.dp}"
            + (", sequence parallel" if self.sequence_parallel else ""),
            f"  stages     {self.layers_per_stage} layers per stage; per TP rank {self.heads_per_rank} heads, "
            f"{self.query_groups_per_rank} KV heads",
            f"  vocabulary {a.vocab_size:,} padded to {self.padded_vocab:,}; {self.vocab_shard:,} rows per TP rank",
            f"  parameters {_count(self.params_per_rank)} per GPU (largest stage)"
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
        lines.append("memory     per GPU, GiB  " + "".join(f"{f'stage {e.stage}':>10}" for e in shown))
        for index, (name, _) in enumerate(m.items()):
            lines.append(f"  {name:<22}" + "".join(f"{e.items()[index][1] / GIB:>10.2f}" for e in shown))
        verdict = "fits" if self.trainer_fits else "DOES NOT FIT"
        lines.append(
            f"  {'total':<22}" + "".join(f"{e.total / GIB:>10.2f}" for e in shown)
            + f"   of {self.budget_bytes / GIB:.1f} ({FIT_FRACTION:.0%} of {self.gpu_memory_bytes / GIB:.0f}): {verdict}"
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
    tp, pp = par.tensor_parallel, par.pipeline_parallel
    _check_world(world_size, tp, pp, gpus_per_node)
    check_layout(arch, tensor_parallel=tp, pipeline_parallel=pp)  # Megatron's own requirements
    check_recompute(arch, pipeline_parallel=pp, granularity=par.recompute_granularity, method=par.recompute_method,
                    num_layers=par.recompute_num_layers)
    check_sequence_parallel(tensor_parallel=tp, sequence_parallel=par.sequence_parallel)
    padded = resolve_padded_vocab(arch, tp, padded_vocab)
    dp = world_size // (tp * pp)
    _check_batch(config, dp, pp)
    _check_rollout_split(config, arch, gpus_per_node, rollout_gpus)
    sequence_length = padded_length(config.data.max_prompt_tokens + config.rollout.max_response_tokens)
    if sequence_length > arch.max_position_embeddings:
        raise ValueError(
            f"config fields data.max_prompt_tokens + rollout.max_response_tokens: {sequence_length} tokens exceed "
            f"the model's max_position_embeddings={arch.max_position_embeddings}; shorten them"
        )

    params = stage_parameters(arch, tp=tp, pp=pp, padded_vocab=padded)
    memory = tuple(
        _stage_memory(config, arch, stage=i, params=p, dp=dp, padded_vocab=padded, sequence_length=sequence_length)
        for i, p in enumerate(params)
    )
    gpu_memory_bytes = int(gpu_memory_gib * GIB)
    layout = Layout(
        arch=arch, world_size=world_size, gpus_per_node=gpus_per_node, tp=tp, pp=pp, dp=dp,
        layers_per_stage=arch.num_layers // pp, heads_per_rank=arch.num_attention_heads // tp,
        query_groups_per_rank=arch.num_query_groups // tp, padded_vocab=padded, vocab_shard=padded // tp,
        params_per_stage=params, params_dtype=config.model.params_dtype, sequence_length=sequence_length,
        max_prompt_tokens=config.data.max_prompt_tokens, max_response_tokens=config.rollout.max_response_tokens,
        prompts_per_step=sched.prompts_per_step, group_size=config.algorithm.group_size,
        minibatches_per_step=sched.minibatches_per_step, micro_batch_size=sched.micro_batch_size,
        sequence_parallel=par.sequence_parallel, recompute=_describe_recompute(par),
        memory_per_stage=memory, gpu_memory_bytes=gpu_memory_bytes,
        rollout=_rollout_estimate(config, arch, gpu_memory_bytes, sequence_length), rollout_gpus=rollout_gpus,
    )
    if not allow_overflow:
        _raise_unless_fits(layout, config)
    return layout


def stage_parameters(arch: Qwen3Arch, *, tp: int, pp: int, padded_vocab: int) -> tuple[int, ...]:
    """Parameters on one GPU of each pipeline stage, as Megatron holds them.

    Linear weights are split over TP, norms replicated; the first stage holds the [V/tp, H]
    embedding, the last the final norm and the [V/tp, H] output layer — a second copy of
    the embedding when the weights are tied and PP > 1 (Megatron keeps the two in sync)."""
    h, d, f = arch.hidden_size, arch.kv_channels, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    linear = h * (q + 2 * kv) + q * h + 3 * h * f  # QKV, projection, fc1 (gate + up), fc2
    per_layer = linear // tp + 2 * h + 2 * d  # input and pre-MLP norms, q and k norms
    embedding = padded_vocab // tp * h
    stages = []
    for stage in range(pp):
        count = arch.num_layers // pp * per_layer
        if stage == 0:
            count += embedding
        if stage == pp - 1:
            count += h  # final norm
            if not (arch.tied_embeddings and pp == 1):
                count += embedding
        stages.append(count)
    return tuple(stages)


def activation_bytes_per_layer(arch: Qwen3Arch, *, tp: int, sequence_length: int, micro_batch_size: int,
                               bytes_per_value: int, flash_attention: bool, sequence_parallel: bool = False) -> int:
    """Bytes one layer saves for backward for one micro-batch (module docstring's formula)."""
    h, d, f = arch.hidden_size, arch.kv_channels, arch.ffn_hidden_size
    a, g = arch.num_attention_heads, arch.num_query_groups
    s, b = sequence_length, micro_batch_size
    sp = tp if sequence_parallel else 1
    saved = bytes_per_value * s * b * (4 * h // sp + (4 * a * d + 4 * g * d + 5 * f) // tp)
    if not flash_attention:
        saved += 5 * a * s * s * b // tp * bytes_per_value // 2
    return saved


def _describe_recompute(parallel) -> str:
    if parallel.recompute_granularity == "none":
        return "none"
    if parallel.recompute_granularity == "selective":
        return "selective (core attention)"
    k = parallel.recompute_num_layers
    if parallel.recompute_method == "uniform":
        return f"full, uniform units of {k} layer{'s' if k > 1 else ''}"
    return f"full, the first {k} layer{'s' if k > 1 else ''} of each stage"


def activation_bytes(arch: Qwen3Arch, parallel, *, sequence_length: int, micro_batch_size: int, bytes_per_value: int,
                     flash_attention: bool, in_flight: int) -> int:
    """Bytes a pipeline stage keeps for backward with `in_flight` micro-batches in flight,
    under `parallel`'s recompute_* settings (module docstring)."""
    tp, layers = parallel.tensor_parallel, arch.num_layers // parallel.pipeline_parallel
    granularity, k = parallel.recompute_granularity, parallel.recompute_num_layers
    sizes = dict(tp=tp, sequence_length=sequence_length, micro_batch_size=micro_batch_size, bytes_per_value=bytes_per_value,
                 sequence_parallel=parallel.sequence_parallel)
    per_layer = activation_bytes_per_layer(arch, flash_attention=flash_attention, **sizes)
    sp = tp if parallel.sequence_parallel else 1
    unit_input = bytes_per_value * sequence_length * micro_batch_size * arch.hidden_size // sp
    if granularity == "full" and parallel.recompute_method == "uniform":
        return in_flight * (layers // k) * unit_input + k * per_layer
    if granularity == "full":  # block: the first k layers of the stage
        return in_flight * (k * unit_input + (layers - k) * per_layer) + per_layer
    if granularity == "selective":
        without_attention = activation_bytes_per_layer(arch, flash_attention=True, **sizes)
        return in_flight * layers * without_attention + (per_layer - without_attention)
    return in_flight * layers * per_layer


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


# --------------------------------------------------------------------------- memory


def _stage_memory(config: Config, arch: Qwen3Arch, *, stage: int, params: int, dp: int, padded_vocab: int,
                  sequence_length: int) -> MemoryEstimate:
    sched, tp, pp = config.schedule, config.parallel.tensor_parallel, config.parallel.pipeline_parallel
    bf16 = config.model.params_dtype == "bfloat16"
    e = 2 if bf16 else 4
    optimizer_bytes = params * (12 if bf16 else 8)
    if config.optimizer.use_distributed_optimizer:
        optimizer_bytes = -(-optimizer_bytes // dp)
    samples_per_rank = sched.prompts_per_step // sched.minibatches_per_step * config.algorithm.group_size // dp
    num_microbatches = -(-samples_per_rank // sched.micro_batch_size)
    in_flight = min(pp - stage, num_microbatches)
    activations = activation_bytes(
        arch, config.parallel, sequence_length=sequence_length, micro_batch_size=sched.micro_batch_size,
        bytes_per_value=e, flash_attention=bf16, in_flight=in_flight,
    )
    last = stage == pp - 1
    response_tokens = sched.micro_batch_size * config.rollout.max_response_tokens
    teacher = samples_per_rank * config.rollout.max_response_tokens * arch.hidden_size * e
    loss = 0
    if last:
        vocab_shard = padded_vocab // tp
        chunk = chunk_tokens(CHUNK_BYTES, "cuda", vocab_shard, buffers=1)
        loss = 3 * min(chunk, response_tokens) * vocab_shard * 4 + response_tokens * arch.hidden_size * e
    return MemoryEstimate(
        stage=stage,
        weights=params * e,
        gradients=params * 4,
        optimizer_state=optimizer_bytes,
        reference_weights=params * e if config.algorithm.uses_reference else 0,
        activations=activations,
        teacher_states=teacher if last and config.algorithm.uses_teacher else 0,
        loss_buffers=loss,
        overhead=CUDA_OVERHEAD_BYTES,
    )


def _rollout_estimate(config: Config, arch: Qwen3Arch, gpu_memory_bytes: int, sequence_length: int) -> RolloutEstimate:
    r = config.rollout
    if r.dtype not in _DTYPE_BYTES:
        raise ValueError(f"config field rollout.dtype: {r.dtype!r} is not one of {sorted(_DTYPE_BYTES)}")
    e, etp = _DTYPE_BYTES[r.dtype], r.engine_tensor_parallel
    weights = arch.num_parameters() * e // etp
    kv_heads_per_gpu = max(1, arch.num_query_groups // etp)
    kv_per_token = 2 * arch.num_layers * kv_heads_per_gpu * arch.kv_channels * e
    explicit = r.kv_cache_bytes is not None
    # vLLM sizes the KV cache from gpu_memory_utilization unless it is given in bytes
    budget = gpu_memory_bytes if explicit else int(r.gpu_memory_utilization * gpu_memory_bytes)
    kv_cache = r.kv_cache_bytes if explicit else budget - weights - ENGINE_RUNTIME_BYTES
    return RolloutEstimate(
        num_engines=r.num_engines, engine_tensor_parallel=etp, dtype=r.dtype, weights_per_gpu=weights,
        kv_cache_per_gpu=kv_cache, kv_bytes_per_token=kv_per_token,
        max_model_len=config.data.max_prompt_tokens + r.max_response_tokens,
        budget_per_gpu=budget, explicit_kv_cache=explicit,
    )


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
}


def _raise_unless_fits(layout: Layout, config: Config) -> None:
    m = layout.memory
    if not layout.trainer_fits:
        name, value = m.largest
        dtype_hint = "" if config.model.params_dtype == "bfloat16" else "; set model.params_dtype=bfloat16 first"
        raise ValueError(
            f"the trainer does not fit: stage {m.stage} needs {m.total / GIB:.1f} GiB per GPU at TP {layout.tp} × "
            f"PP {layout.pp} × DP {layout.dp} (budget {layout.budget_bytes / GIB:.1f} GiB = {FIT_FRACTION:.0%} of "
            f"{layout.gpu_memory_bytes / GIB:.0f}); the largest item is {name} ({value / GIB:.1f} GiB): "
            f"{_ADVICE[name]}{dtype_hint}. Pass allow_overflow to plan anyway.\n{layout.describe()}"
        )
    if not layout.rollout_fits:
        problem = _rollout_problem(layout.rollout)
        raise ValueError(f"the rollout fleet does not fit: config field {problem}")


def _count(num_parameters: int) -> str:
    return f"{num_parameters / 1e9:.3f}B" if num_parameters >= 1e8 else f"{num_parameters / 1e6:.2f}M"
