"""Per-GPU arithmetic of a launch, without GPUs: the parameters each trainer GPU holds per
pipeline stage (experts included), the activations a stage keeps for backward, the bytes
every trainer GPU needs at its peak item by item (`MemoryEstimate`) and a rollout engine
GPU's weights and KV cache (`RolloutEstimate`). `layout.plan_layout` checks a launch and
judges these estimates against the GPU.

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

Mixture-of-experts models (Qwen3-MoE) regroup each stage's TP × DP ranks as Megatron
does, into expert-TP × EP × expert-DP (parallel.expert_tensor_parallel = etp,
parallel.expert_parallel = ep, expert DP = TP × DP / (EP × ETP)); EP × ETP must divide
TP × DP, and at EP 1 ETP must equal TP (`model.provider.check_layout`). Their memory has
two halves:

- non-expert   attention, norms, the router ([E, h], whole on every TP rank) and the
               embeddings: split by TP and PP and itemised exactly as above;
- experts      L/pp layers × E/ep experts × 3·h·f_e/etp parameters per GPU (f_e =
               moe_ffn_hidden_size), in rows of their own: expert_weights (e),
               expert_gradients (4 B), expert_optimizer_state (12 or 8 B, divided by the
               expert DP: the distributed optimizer shards expert parameters over the
               expert-data-parallel group) and expert_reference_weights (e);
- activations  an MoE layer keeps the attention terms above, e·s·b·(4h/sp + (4ad + 4gd)/tp),
               and per token of this rank (s·b/sp of them) the router's and dispatcher's
               bookkeeping — fp32 scores and routing probabilities over the E experts, the
               boolean routing map, the top-k indices and probabilities, the permutation
               indices: 9·E + 28·k B for k = experts_per_token — and the token's k routed
               copies. Assuming balanced routing (each EP rank receives its 1/EP share of
               the copies: the load-balancing loss pushes towards it, but dropless routing
               can give a busy rank more), after the all-to-all over EP and the all-gather
               over ETP a rank's experts hold k·etp copies per local token, each saving
               the h-wide input of the grouped fc1, 6·f_e/etp values — fc1's output
               (2f_e), the SiLU output, x_linear + glu_linear_offset, the SwiGLU product
               the routing probability scales, fc2's input (Megatron's unfused SwiGLU with
               the probabilities applied after the activation) — and that probability
               (fp32):
                   s·b/sp · (e·k·(etp·h + 6·f_e) + 4·k·etp + 9·E + 28·k),
               checked with saved-tensor hooks on CPU as DP 2, at EP 2 and at TP 2 = ETP 2
               (Megatron's SequentialMLP there; TEGroupedMLP saves the same tensors by
               the code).
               Megatron's MoE layer refuses to train at TP > 1 without sequence
               parallelism, so sp = tp there.

The rollout engines hold the whole model, every expert, on each engine (vLLM splits
each expert over the engine TP).

The activation count is that of Transformer Engine's layer spec, which the trainer builds
on GPUs with transformer-engine installed; a GPU without it gets Megatron's local spec
(unfused attention, [s, s] scores per layer), which `model.provider` logs as a warning.
Lengths are upper bounds (a step pads to its longest sequence), and transient buffers
(the backward's gradient tensors, the forward-only teacher/reference passes, weight-push
buckets) are left to the margin: `layout` judges a layout to fit when its largest stage
needs at most 90% of the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdpg_megatron.config import Config
from sdpg_megatron.model.qwen3 import Qwen3Arch
from sdpg_megatron.parallel.chunks import chunk_tokens
from sdpg_megatron.parallel.vocab_parallel import CHUNK_BYTES

GIB = 2**30
CUDA_OVERHEAD_BYTES = 3 * GIB  # CUDA context, NCCL buffers, allocator fragmentation
ENGINE_RUNTIME_BYTES = 2 * GIB  # vLLM's activation peak and CUDA context beside weights and KV cache
EXPERT_ITEMS = ("expert_weights", "expert_gradients", "expert_optimizer_state", "expert_reference_weights")
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "auto": 2}


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Peak bytes on one GPU of pipeline stage `stage` (see the module docstring)."""

    stage: int
    weights: int
    gradients: int
    optimizer_state: int
    reference_weights: int
    # a mixture-of-experts model's experts (0 for dense models); the four rows above are
    # then its non-expert parameters
    expert_weights: int
    expert_gradients: int
    expert_optimizer_state: int
    expert_reference_weights: int
    activations: int
    teacher_states: int
    loss_buffers: int
    overhead: int

    def items(self) -> list[tuple[str, int]]:
        return [(name, getattr(self, name)) for name in (
            "weights", "gradients", "optimizer_state", "reference_weights", *EXPERT_ITEMS,
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


def stage_parameters(arch: Qwen3Arch, *, tp: int, pp: int, padded_vocab: int, ep: int = 1,
                     etp: int = 1) -> tuple[int, ...]:
    """Parameters on one GPU of each pipeline stage, as Megatron holds them, experts included.

    Linear weights are split over TP, norms replicated; the first stage holds the [V/tp, H]
    embedding, the last the final norm and the [V/tp, H] output layer — a second copy of
    the embedding when the weights are tied and PP > 1 (Megatron keeps the two in sync).
    A mixture-of-experts layer has, instead of the dense MLP, the router's [E, H] weight
    (whole on every TP rank) and E/ep experts split over ETP (`expert_stage_parameters`)."""
    h, d, f = arch.hidden_size, arch.kv_channels, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    attention = h * (q + 2 * kv) + q * h  # QKV, projection
    norms = 2 * h + 2 * d  # input and pre-MLP norms, q and k norms
    if arch.is_moe:
        per_layer = attention // tp + arch.num_experts * h + norms
    else:
        per_layer = (attention + 3 * h * f) // tp + norms  # + fc1 (gate + up), fc2
    experts = expert_stage_parameters(arch, pp=pp, ep=ep, etp=etp)
    embedding = padded_vocab // tp * h
    stages = []
    for stage in range(pp):
        count = arch.num_layers // pp * per_layer + experts
        if stage == 0:
            count += embedding
        if stage == pp - 1:
            count += h  # final norm
            if not (arch.tied_embeddings and pp == 1):
                count += embedding
        stages.append(count)
    return tuple(stages)


def expert_stage_parameters(arch: Qwen3Arch, *, pp: int, ep: int = 1, etp: int = 1) -> int:
    """Expert parameters on one GPU of any pipeline stage: its layers' E/ep experts, each
    one's SwiGLU (fc1 gate + up, fc2) split over ETP; 0 for a dense model."""
    per_expert = 3 * arch.hidden_size * arch.moe_ffn_hidden_size // etp
    return arch.num_layers // pp * (arch.num_experts // ep) * per_expert


def moe_activation_bytes(arch: Qwen3Arch, *, local_tokens: int, bytes_per_value: int,
                         expert_tensor_parallel: int = 1) -> int:
    """Bytes an MoE layer's router, dispatcher and experts save for backward on one rank
    holding `local_tokens` tokens (s·b/sp), under balanced routing (module docstring)."""
    k, f_e, etp = arch.experts_per_token, arch.moe_ffn_hidden_size, expert_tensor_parallel
    routed = bytes_per_value * k * (etp * arch.hidden_size + 6 * f_e) + 4 * k * etp
    return local_tokens * (routed + 9 * arch.num_experts + 28 * k)


def activation_bytes_per_layer(arch: Qwen3Arch, *, tp: int, sequence_length: int, micro_batch_size: int,
                               bytes_per_value: int, flash_attention: bool, sequence_parallel: bool = False,
                               expert_tensor_parallel: int = 1) -> int:
    """Bytes one layer saves for backward for one micro-batch (module docstring's formulas,
    dense or mixture-of-experts)."""
    h, d, f = arch.hidden_size, arch.kv_channels, arch.ffn_hidden_size
    a, g = arch.num_attention_heads, arch.num_query_groups
    s, b = sequence_length, micro_batch_size
    sp = tp if sequence_parallel else 1
    if arch.is_moe:
        saved = bytes_per_value * s * b * (4 * h // sp + (4 * a * d + 4 * g * d) // tp)
        saved += moe_activation_bytes(arch, local_tokens=s * b // sp, bytes_per_value=bytes_per_value,
                                      expert_tensor_parallel=expert_tensor_parallel)
    else:
        saved = bytes_per_value * s * b * (4 * h // sp + (4 * a * d + 4 * g * d + 5 * f) // tp)
    if not flash_attention:
        saved += 5 * a * s * s * b // tp * bytes_per_value // 2
    return saved


def activation_bytes(arch: Qwen3Arch, parallel, *, sequence_length: int, micro_batch_size: int, bytes_per_value: int,
                     flash_attention: bool, in_flight: int) -> int:
    """Bytes a pipeline stage keeps for backward with `in_flight` micro-batches in flight,
    under `parallel`'s recompute_* settings (module docstring)."""
    tp, layers = parallel.tensor_parallel, arch.num_layers // parallel.pipeline_parallel
    granularity, k = parallel.recompute_granularity, parallel.recompute_num_layers
    sizes = dict(tp=tp, sequence_length=sequence_length, micro_batch_size=micro_batch_size,
                 bytes_per_value=bytes_per_value, sequence_parallel=parallel.sequence_parallel,
                 expert_tensor_parallel=parallel.expert_tensor_parallel)
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


def stage_memory(config: Config, arch: Qwen3Arch, *, stage: int, params: int, expert_params: int, dp: int,
                 expert_dp: int, padded_vocab: int, sequence_length: int) -> MemoryEstimate:
    """One GPU of pipeline stage `stage`, item by item: `params` of which `expert_params`
    are experts; the distributed optimizer shards the rest over DP and the experts over
    expert DP."""
    sched, tp, pp = config.schedule, config.parallel.tensor_parallel, config.parallel.pipeline_parallel
    bf16 = config.model.params_dtype == "bfloat16"
    e = 2 if bf16 else 4
    dense = params - expert_params
    optimizer_bytes, expert_optimizer_bytes = (count * (12 if bf16 else 8) for count in (dense, expert_params))
    if config.optimizer.use_distributed_optimizer:
        optimizer_bytes = -(-optimizer_bytes // dp)
        expert_optimizer_bytes = -(-expert_optimizer_bytes // expert_dp)
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
    reference = config.algorithm.uses_reference
    return MemoryEstimate(
        stage=stage,
        weights=dense * e,
        gradients=dense * 4,
        optimizer_state=optimizer_bytes,
        reference_weights=dense * e if reference else 0,
        expert_weights=expert_params * e,
        expert_gradients=expert_params * 4,
        expert_optimizer_state=expert_optimizer_bytes,
        expert_reference_weights=expert_params * e if reference else 0,
        activations=activations,
        teacher_states=teacher if last and config.algorithm.uses_teacher else 0,
        loss_buffers=loss,
        overhead=CUDA_OVERHEAD_BYTES,
    )


def rollout_estimate(config: Config, arch: Qwen3Arch, gpu_memory_bytes: int,
                     sequence_length: int) -> RolloutEstimate:
    """One vLLM engine GPU under `config.rollout`: every engine holds the whole model, and
    its KV cache is rollout.kv_cache_bytes or what gpu_memory_utilization leaves."""
    r = config.rollout
    if r.dtype not in _DTYPE_BYTES:
        raise ValueError(f"config field rollout.dtype: {r.dtype!r} is not one of {sorted(_DTYPE_BYTES)}")
    e, etp = _DTYPE_BYTES[r.dtype], r.engine_tensor_parallel
    weights = arch.num_parameters() * e // etp  # every engine holds the whole model, all experts included
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

