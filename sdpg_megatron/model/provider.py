"""Qwen3 on Megatron-Core: TransformerConfig, layer spec and a model provider.

Nothing here reads global arguments: the provider takes the architecture, the
TransformerConfig and the pipeline flags, as Megatron's `model_provider(pre_process,
post_process, vp_stage)` contract expects (bind the rest with functools.partial).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from sdpg_megatron.experience import SEQUENCE_MULTIPLE
from sdpg_megatron.model.qwen3 import Qwen3Arch
from sdpg_megatron.parallel.vocab_parallel import padded_vocab_size

logger = logging.getLogger(__name__)


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def resolve_transformer_engine(use_transformer_engine: bool | None) -> bool:
    """Whether to build TE's layer spec. None: when TE is usable; on a GPU without TE that
    is Megatron's local spec, logged once with the fix (on CPU it is the only spec and
    says nothing). True without TE on a GPU: ValueError."""
    if use_transformer_engine is None:
        if transformer_engine_available():
            return True
        if torch.cuda.is_available():
            _warn_once(
                "transformer-engine is not installed on this GPU machine, so the model is built with Megatron's "
                "local layer spec: unfused attention that keeps every layer's [s, s] attention scores, unfused "
                "norms, slower throughout, and more activation memory than the launch planner "
                "(sdpg_megatron/layout.py, which models TE's fused attention for bf16) budgets for; "
                "schedule.pack_sequences is refused. Fix: install the GPU stack's transformer-engine "
                "(requirements/gpu.txt; README.md, GPU install)."
            )
        return False
    if use_transformer_engine and not transformer_engine_available():
        raise ValueError(
            "use_transformer_engine=True needs transformer-engine on a CUDA machine "
            f"(installed: {importlib.util.find_spec('transformer_engine') is not None}, "
            f"CUDA: {torch.cuda.is_available()}); install the GPU stack's transformer-engine "
            "(requirements/gpu.txt), or pass use_transformer_engine=False for Megatron's local spec"
        )
    return bool(use_transformer_engine)


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def transformer_config(
    arch: Qwen3Arch,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int = 1,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    recompute_granularity: str = "none",
    recompute_method: str = "uniform",
    recompute_num_layers: int = 1,
    variable_seq_lengths: bool = False,
) -> TransformerConfig:
    """Qwen3: GQA, QK RMSNorm, RMSNorm, SwiGLU, RoPE, no biases, explicit head_dim.

    recompute_*: `ParallelConfig`'s activation recomputation ("none", "selective" = core
    attention, "full" = whole layers by `recompute_method` in units of `recompute_num_layers`).
    variable_seq_lengths: micro-batches differ in shape (dynamic batching, packed
    sequences); the pipeline schedule then sends each activation's shape before it.
    expert_parallel / expert_tensor_parallel: how a mixture-of-experts model splits its
    experts (`moe_settings`); dense models take 1 and 1."""
    check_layout(arch, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                 expert_parallel=expert_parallel, expert_tensor_parallel=expert_tensor_parallel)
    check_recompute(arch, pipeline_parallel=pipeline_parallel, granularity=recompute_granularity,
                    method=recompute_method, num_layers=recompute_num_layers)
    check_sequence_parallel(tensor_parallel=tensor_parallel, sequence_parallel=sequence_parallel)
    full = recompute_granularity == "full"
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        # Megatron's fused softmax needs its compiled kernels (apex / megatron fused kernels);
        # without them it would fail at the first attention, so use the unfused softmax.
        masked_softmax_fusion=on_gpu and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
        persist_layer_norm=False,
        recompute_granularity=None if recompute_granularity == "none" else recompute_granularity,
        recompute_method=recompute_method if full else None,
        recompute_num_layers=recompute_num_layers if full else None,
        variable_seq_lengths=variable_seq_lengths,
        **moe_settings(arch, expert_parallel=expert_parallel, expert_tensor_parallel=expert_tensor_parallel,
                       variable_seq_lengths=variable_seq_lengths,
                       sequence_shards=tensor_parallel if sequence_parallel else 1),
    )


def moe_settings(arch: Qwen3Arch, *, expert_parallel: int, expert_tensor_parallel: int,
                 variable_seq_lengths: bool, sequence_shards: int = 1) -> dict:
    """TransformerConfig's mixture-of-experts fields for `arch` (Qwen3-MoE's router in
    Megatron's terms).

    - top-k of the softmax, renormalised (norm_topk_prob) ⇔ Megatron's softmax over the
      top-k logits (moe_router_pre_softmax=False); unnormalised ⇔ pre-softmax;
    - the load-balancing loss is Megatron's per-layer, per-micro-batch switch loss
      ("aux_loss") weighted by router_aux_loss_coef; router logits in fp32 where
      transformer-engine is (as Megatron-based peers run Qwen3-MoE). With per-token loss
      scaling Megatron scales each rank's share of the term by the tokens that rank routes,
      which under sequence parallelism is 1/TP of the sequence: the coefficient is
      multiplied by `sequence_shards` (TP with sequence parallelism) so that the term's
      gradient is the same at every layout (tests/test_moe_training_step.py);
    - dropless, all-to-all token dispatch over the expert-parallel group (runs over gloo
      on CPU); grouped GEMM where transformer-engine is (GPU), one MLP per expert otherwise.
    Dense models: Megatron refuses variable_seq_lengths with its default dispatcher
    ("allgather") even without experts; dense Qwen3 builds no dispatcher, so "alltoall" there
    changes nothing."""
    if not arch.is_moe:
        return {"moe_token_dispatcher_type": "alltoall" if variable_seq_lengths else "allgather"}
    return {
        "num_moe_experts": arch.num_experts,
        "moe_router_topk": arch.experts_per_token,
        "moe_ffn_hidden_size": arch.moe_ffn_hidden_size,
        "moe_router_pre_softmax": not arch.norm_topk_prob,
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": arch.router_aux_loss_coef * sequence_shards,
        # Megatron's fp32 router GEMM needs transformer-engine (without it, 0.16.1 fails with
        # a NameError); without TE the router runs in the parameters' dtype
        "moe_router_dtype": "fp32" if transformer_engine_available() else None,
        "moe_token_dispatcher_type": "alltoall",
        "moe_grouped_gemm": transformer_engine_available(),
        "moe_permute_fusion": False,
        "expert_model_parallel_size": expert_parallel,
        "expert_tensor_parallel_size": expert_tensor_parallel,
    }


def check_sequence_parallel(*, tensor_parallel: int, sequence_parallel: bool) -> None:
    """ValueError unless each padded sequence splits evenly over the TP ranks (TP > 1 is
    the config's check, and Megatron's)."""
    if sequence_parallel and SEQUENCE_MULTIPLE % tensor_parallel:
        raise ValueError(
            f"parallel.sequence_parallel splits each sequence over the {tensor_parallel} TP ranks, but sequences are "
            f"padded to multiples of {SEQUENCE_MULTIPLE}: use a tensor parallel size that divides {SEQUENCE_MULTIPLE} "
            "or turn sequence parallelism off"
        )


def check_recompute(arch: Qwen3Arch, *, pipeline_parallel: int, granularity: str, method: str, num_layers: int) -> None:
    """ValueError naming the recompute field whose value this model and PP size cannot take
    (the values themselves are the config's check, and Megatron's)."""
    if granularity != "full":
        return
    per_stage = arch.num_layers // pipeline_parallel
    if method == "uniform" and per_stage % num_layers:
        raise ValueError(
            f"parallel.recompute_num_layers={num_layers} must divide the {per_stage} layers of each pipeline stage "
            f"with recompute_method=uniform (Megatron recomputes whole units); choose one of {divisors(per_stage)}"
        )
    if method == "block" and not 1 <= num_layers <= per_stage:
        raise ValueError(
            f"parallel.recompute_num_layers={num_layers} must be in [1, {per_stage}] (the layers of one pipeline "
            "stage) with recompute_method=block"
        )


def check_layout(arch: Qwen3Arch, *, tensor_parallel: int, pipeline_parallel: int, expert_parallel: int = 1,
                 expert_tensor_parallel: int = 1) -> None:
    """ValueError naming the quantity that a TP/PP/EP/ETP size does not divide, and sizes
    that do."""
    tp, pp, ep, etp = tensor_parallel, pipeline_parallel, expert_parallel, expert_tensor_parallel
    if min(tp, pp, ep, etp) < 1:
        raise ValueError(f"tensor, pipeline, expert and expert tensor parallel sizes must be >= 1, got {tp}, {pp}, "
                         f"{ep}, {etp}")
    if not arch.is_moe and (ep, etp) != (1, 1):
        raise ValueError(f"expert parallel sizes (parallel.expert_parallel={ep}, parallel.expert_tensor_parallel="
                         f"{etp}, --ep) apply to mixture-of-experts models only; this model is dense: set them to 1")
    if arch.is_moe:
        if arch.num_experts % ep:
            raise ValueError(f"expert parallel size {ep} (parallel.expert_parallel, --ep) does not divide "
                             f"num_experts={arch.num_experts}; choose one of {divisors(arch.num_experts)}")
        if ep == 1 and etp != tp:
            # Megatron marks experts as expert-parallel only at EP > 1; at EP 1 their gradients
            # are reduced as dense ones, over the data-parallel group alone, which is right only
            # when experts are split like the dense layers
            raise ValueError(
                f"without expert parallelism (parallel.expert_parallel=1) Megatron treats experts as dense layers, so "
                f"parallel.expert_tensor_parallel must equal parallel.tensor_parallel={tp} (got {etp}); set it to "
                f"{tp}, or split the experts with parallel.expert_parallel > 1"
            )
        if arch.moe_ffn_hidden_size % etp:
            raise ValueError(f"expert tensor parallel size {etp} (parallel.expert_tensor_parallel, --etp) does not "
                             f"divide moe_ffn_hidden_size={arch.moe_ffn_hidden_size}; choose one of "
                             f"{divisors(arch.moe_ffn_hidden_size)}")
    quantities = (("num_attention_heads", arch.num_attention_heads), ("num_query_groups", arch.num_query_groups),
                  *((("ffn_hidden_size", arch.ffn_hidden_size),) if not arch.is_moe else ()))
    for quantity, value in quantities:
        if value % tp:
            valid = divisors(math.gcd(*(v for _, v in quantities)))
            raise ValueError(
                f"tensor parallel size {tp} (parallel.tensor_parallel, --tp) does not divide {quantity}={value} "
                f"(query groups are the KV heads); choose one of {valid}"
            )
    if arch.num_layers % pp:
        raise ValueError(
            f"pipeline parallel size {pp} (parallel.pipeline_parallel, --pp) does not divide "
            f"num_layers={arch.num_layers}; Megatron can split layers unevenly but this recipe does not: "
            f"choose one of {divisors(arch.num_layers)}"
        )


def resolve_padded_vocab(arch: Qwen3Arch, tp: int, padded_vocab: int | None = None) -> int:
    """The model's padded vocabulary at TP `tp`: a checkpoint's recorded padding when given
    (checked), else Megatron's padding for this TP size."""
    if padded_vocab is None:
        return padded_vocab_size(arch.vocab_size, tp)
    if padded_vocab < arch.vocab_size or padded_vocab % tp:
        raise ValueError(
            f"the checkpoint's padded vocabulary {padded_vocab} must be >= vocab_size={arch.vocab_size} and "
            f"divisible by the tensor parallel size {tp} (parallel.tensor_parallel); convert the checkpoint "
            f"again with --tp {tp}"
        )
    return padded_vocab


def divisors(value: int) -> list[int]:
    return [n for n in range(1, value + 1) if value % n == 0]


def layer_spec(use_transformer_engine: bool | None = None, num_experts: int | None = None):
    """TE spec when transformer-engine is usable (GPU), Megatron's local spec otherwise
    (`resolve_transformer_engine`: a GPU without TE says so once).

    Both hold the same weights; only the TE spec fuses the norms into the next linear
    (see `hf_mapping.te_alias`). The local spec's norms are `RMSNorm` below (Megatron's
    own wrapper of torch's RMSNorm refuses sequence parallelism)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.spec_utils import ModuleSpec

    if resolve_transformer_engine(use_transformer_engine):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=num_experts is not None, qk_layernorm=True)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=num_experts, qk_layernorm=True, normalization="RMSNorm")
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
    attention = layer.self_attention.submodules
    # q/k norms act on whole sequences (after the QKV projection's gather), one head at a time
    attention.q_layernorm = attention.k_layernorm = ModuleSpec(module=RMSNorm, params={"sequence_sharded": False})
    return spec


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm built the way Megatron builds norms, for the local spec.

    With sequence parallelism a norm's input is this rank's slice of the sequence, so its
    weight gradient is a partial sum: the weight is marked `sequence_parallel`, and
    Megatron's `finalize_model_grads` all-reduces it over the TP group (as TE's norms are
    marked). q/k norms see whole sequences and are left unmarked; Megatron reduces their
    gradients by name (each rank holds different heads)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, *,
                 sequence_sharded: bool = True, **unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = sequence_sharded and config.sequence_parallel


def block_spec(config: TransformerConfig, use_transformer_engine: bool | None = None, vp_stage: int | None = None):
    """The decoder block's spec: `layer_spec` for this stage's layers, and for the local
    spec the final norm as `RMSNorm` too (Megatron would pick its own wrapper)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    use_transformer_engine = resolve_transformer_engine(use_transformer_engine)
    spec = layer_spec(use_transformer_engine, config.num_moe_experts)
    if use_transformer_engine:
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage), layer_norm=RMSNorm)


def define_router_gemm_without_te() -> None:
    """Megatron-Core 0.16.1's router GEMM tests `te_general_gemm is not None`, but only
    binds the name when transformer-engine imports: without TE every MoE forward fails with
    a NameError. Bind it to None there, which selects the plain torch.mm path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class PolicyGPTModel(GPTModel):
    """GPTModel whose last stage can return final hidden states instead of logits.

    Training never materialises [tokens × vocab] logits: `forward(..., return_hidden=True)`
    returns the final-norm hidden states [s, b, H] and the fused vocab-parallel loss reads
    the output weight shard from `output_weight()`.
    """

    _return_hidden = False

    def forward(self, *args, return_hidden: bool = False, **kwargs):
        self._return_hidden = return_hidden
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._return_hidden = False

    def _postprocess(self, hidden_states, *args, **kwargs):
        if self._return_hidden and self.post_process:
            if self.config.sequence_parallel:
                # [s/tp, b, H] per rank → the whole sequence on every rank. The fused loss
                # all-reduces its hidden-state gradient over TP, so the backward of this
                # gather only keeps this rank's slice of it (no second reduction).
                from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

                return gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
            return hidden_states
        return super()._postprocess(hidden_states, *args, **kwargs)

    def output_weight(self) -> torch.Tensor:
        """This TP rank's [V/tp, H] output weight (the embedding when tied)."""
        if not self.post_process:
            raise ValueError("only the last pipeline stage has an output layer")
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


def response_states(hidden_states: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[N, H] final hidden states at the response positions, in (sequence, position) order.

    Args:
        hidden_states: [s, b, H] as the model returns them (Megatron's sequence-first layout).
        response_mask: [b, s], True where the position predicts a response token.

    The student and teacher views hold the same response tokens after prefixes of different
    lengths; selecting each view with its own mask gives rows that align token for token.
    """
    if hidden_states.shape[:2] != response_mask.shape[::-1]:
        raise ValueError(
            f"response_mask {tuple(response_mask.shape)} does not match hidden states "
            f"[s, b] = {tuple(hidden_states.shape[:2])}"
        )
    return hidden_states.transpose(0, 1)[response_mask.bool()]


def model_provider(
    arch: Qwen3Arch,
    config: TransformerConfig,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    *,
    padded_vocab: int | None = None,
    use_transformer_engine: bool | None = None,
) -> PolicyGPTModel:
    """Megatron's provider signature; bind `arch` and `config` with functools.partial.

    `padded_vocab` defaults to Megatron's padding for this TP size; a checkpoint records
    the padding it was written with, and a model loading it must use the same."""
    padded_vocab = resolve_padded_vocab(arch, config.tensor_model_parallel_size, padded_vocab)
    if arch.is_moe:
        define_router_gemm_without_te()
    return PolicyGPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, use_transformer_engine, vp_stage),
        vocab_size=padded_vocab,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_base),
        vp_stage=vp_stage,
    )
