"""The one Hugging Face ↔ Megatron-Core table for Qwen3 and Qwen3-MoE.

Conversion (`tools/hf_to_mcore.py`, `tools/mcore_to_hf.py`) and, later, weight resharding
to vLLM all go through `RULES`. A rule names one Megatron parameter (global layer index,
global expert index, local layer spec names), the Hugging Face tensors it is made of, how
they combine, and how the result is split over tensor-parallel ranks (expert tensors: over
expert-tensor-parallel ranks):

- vocab:        rows are vocabulary ids, padded with zero rows to the TP-padded vocab;
                TP splits rows (the column-parallel output layer / vocab-parallel embedding)
- qkv:          [q; k; v] interleaved per query group (group g: its q heads, k_g, v_g);
                TP splits rows, i.e. whole query groups
- gated_column: [gate; up] stacked; TP rank r holds [gate_r; up_r]
- column / row: TP splits rows / columns
- replicated:   norms, identical on every TP rank

The TE layer spec fuses the pre-attention and pre-MLP norms into the following linear
layer (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`) and keeps a
grouped-GEMM layer's experts as `experts.linear_fc1.weight{e}`; `te_alias` maps those names
onto the local spec's names used here (`experts.local_experts.{e}.linear_fc1.weight`).

Experts are the published checkpoints' per-expert tensors (`mlp.experts.{e}.gate_proj`, as
Qwen3-30B-A3B's safetensors hold them and vLLM loads them), never transformers' in-memory
fused `gate_up_proj`. A rank of an expert-parallel layout holds experts
[ep_rank · E/EP, (ep_rank + 1) · E/EP) under local indices from 0: `global_name` adds the
offset as it adds the pipeline stage's layer offset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from sdpg_megatron.model.qwen3 import Qwen3Arch

TensorReader = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class Rule:
    mcore: str  # Megatron name; "{i}" is the global layer index
    hf: tuple[str, ...]  # Hugging Face names it is built from
    kind: str  # vocab | qkv | gated_column | column | row | replicated


RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), "replicated"),
    Rule(
        "decoder.layers.{i}.self_attention.linear_qkv.weight",
        ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
         "model.layers.{i}.self_attn.v_proj.weight"),
        "qkv",
    ),
    Rule("decoder.layers.{i}.self_attention.q_layernorm.weight", ("model.layers.{i}.self_attn.q_norm.weight",), "replicated"),
    Rule("decoder.layers.{i}.self_attention.k_layernorm.weight", ("model.layers.{i}.self_attn.k_norm.weight",), "replicated"),
    Rule("decoder.layers.{i}.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",), "row"),
    Rule("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",), "replicated"),
    Rule(
        "decoder.layers.{i}.mlp.linear_fc1.weight",
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
        "gated_column",
    ),
    Rule("decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), "row"),
    Rule("decoder.layers.{i}.mlp.router.weight", ("model.layers.{i}.mlp.gate.weight",), "replicated"),
    Rule(
        "decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight",
        ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "model.layers.{i}.mlp.experts.{e}.up_proj.weight"),
        "gated_column",
    ),
    Rule("decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight",
         ("model.layers.{i}.mlp.experts.{e}.down_proj.weight",), "row"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab"),
)

_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")  # after _LAYER's layer index
_TE_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
_MOE_ONLY = ("mlp.router.", "mlp.experts.")
_DENSE_ONLY = ("mlp.linear_fc1.", "mlp.linear_fc2.")


def te_alias(name: str) -> str:
    """A TE-spec parameter name in the local spec's naming (identity otherwise)."""
    match = _LAYER.match(name)
    if match and match.group(2) in _TE_ALIASES:
        return f"decoder.layers.{match.group(1)}.{_TE_ALIASES[match.group(2)]}"
    grouped = _TE_GROUPED_EXPERT.match(match.group(2)) if match else None
    if grouped:
        return f"decoder.layers.{match.group(1)}.mlp.experts.local_experts.{grouped.group(2)}.{grouped.group(1)}.weight"
    return name


def is_expert(name: str) -> bool:
    """Whether a Megatron parameter name (either spec's naming) is one expert's weight:
    split over expert-parallel ranks, and over expert-TP ranks instead of TP ranks."""
    match = _LAYER.match(te_alias(name))
    return bool(match and _EXPERT.match(match.group(2)))


def expert_offset(num_experts: int, ep_size: int, ep_rank: int) -> int:
    """The global index of this expert-parallel rank's first expert."""
    if num_experts % ep_size:
        raise ValueError(f"expert parallel size {ep_size} does not divide num_experts={num_experts}")
    return ep_rank * (num_experts // ep_size)


def layer_offset(num_layers: int, pp_size: int, pp_rank: int) -> int:
    if num_layers % pp_size:
        raise ValueError(f"pipeline size {pp_size} does not divide num_layers={num_layers}")
    return pp_rank * (num_layers // pp_size)


def global_name(local_name: str, offset: int, expert_offset: int = 0) -> str:
    """A stage-local Megatron name (`decoder.layers.3...`) with the global layer index and,
    for an expert, the global expert index."""
    local_name = te_alias(local_name)
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    rest = match.group(2)
    expert = _EXPERT.match(rest)
    if expert:
        rest = f"mlp.experts.local_experts.{int(expert.group(1)) + expert_offset}.{expert.group(2)}"
    return f"decoder.layers.{int(match.group(1)) + offset}.{rest}"


def _applies(rule: Rule, arch: Qwen3Arch) -> bool:
    if rule.mcore == "output_layer.weight" and arch.tied_embeddings:
        return False
    only = _MOE_ONLY if not arch.is_moe else _DENSE_ONLY
    return not any(part in rule.mcore for part in only)


def rules_for(arch: Qwen3Arch) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(mcore name, hf names, kind) for every tensor of `arch`, layers and experts expanded."""
    for rule in RULES:
        if not _applies(rule, arch):
            continue
        layers = range(arch.num_layers) if "{i}" in rule.mcore else [None]
        experts = range(arch.num_experts) if "{e}" in rule.mcore else [None]
        for i in layers:
            for e in experts:
                yield (rule.mcore.format(i=i, e=e), tuple(h.format(i=i, e=e) for h in rule.hf), rule.kind)


def find_rule(arch: Qwen3Arch, mcore_name: str) -> tuple[tuple[str, ...], str]:
    """The HF sources and kind of a global Megatron name. With tied embeddings the last
    pipeline stage's `output_layer.weight` is the embedding's copy."""
    if mcore_name == "output_layer.weight" and arch.tied_embeddings:
        mcore_name = "embedding.word_embeddings.weight"
    match = _LAYER.match(mcore_name)
    index = expert = None
    pattern = mcore_name
    if match:
        index, rest = int(match.group(1)), match.group(2)
        expert_match = _EXPERT.match(rest)
        if expert_match:
            expert, rest = int(expert_match.group(1)), f"mlp.experts.local_experts.{{e}}.{expert_match.group(2)}"
        pattern = f"decoder.layers.{{i}}.{rest}"
    for rule in RULES:
        if rule.mcore == pattern and _applies(rule, arch):
            if index is not None and not 0 <= index < arch.num_layers:
                break
            if expert is not None and not 0 <= expert < arch.num_experts:
                break
            return tuple(h.format(i=index, e=expert) for h in rule.hf), rule.kind
    raise KeyError(f"no HF mapping for Megatron parameter {mcore_name!r}")


# --------------------------------------------------------------------------- combine / split


def to_mcore(kind: str, hf_tensors: list[torch.Tensor], arch: Qwen3Arch, padded_vocab: int) -> torch.Tensor:
    """The global (unsharded) Megatron tensor from its HF tensors."""
    if kind == "vocab":
        (weight,) = hf_tensors
        if padded_vocab > weight.shape[0]:
            padding = weight.new_zeros(padded_vocab - weight.shape[0], weight.shape[1])
            weight = torch.cat([weight, padding])
        return weight
    if kind == "qkv":
        q, k, v = hf_tensors
        groups, head_dim = arch.num_query_groups, arch.kv_channels
        heads_per_group = arch.num_attention_heads // groups
        q = q.reshape(groups, heads_per_group * head_dim, -1)
        k = k.reshape(groups, head_dim, -1)
        v = v.reshape(groups, head_dim, -1)
        return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
    if kind == "gated_column":
        return torch.cat(hf_tensors, dim=0)
    (tensor,) = hf_tensors
    return tensor


def to_hf(kind: str, tensor: torch.Tensor, arch: Qwen3Arch) -> list[torch.Tensor]:
    """Inverse of `to_mcore`: the HF tensors of a global Megatron tensor."""
    if kind == "vocab":
        return [tensor[: arch.vocab_size]]
    if kind == "qkv":
        groups, head_dim = arch.num_query_groups, arch.kv_channels
        heads_per_group = arch.num_attention_heads // groups
        grouped = tensor.reshape(groups, (heads_per_group + 2) * head_dim, -1)
        q, k, v = grouped.split([heads_per_group * head_dim, head_dim, head_dim], dim=1)
        hidden = tensor.shape[-1]
        return [q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)]
    if kind == "gated_column":
        return list(tensor.chunk(2, dim=0))
    return [tensor]


def tp_shard(kind: str, tensor: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's slice of a global Megatron tensor."""
    if tp_size == 1 or kind == "replicated":
        return tensor
    if kind in ("vocab", "qkv", "column"):
        return tensor.chunk(tp_size, dim=0)[tp_rank]
    if kind == "row":
        return tensor.chunk(tp_size, dim=1)[tp_rank]
    if kind == "gated_column":
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
    raise ValueError(f"unknown parallel kind {kind!r}")


def tp_gather(kind: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `tp_shard`: the global tensor from every TP rank's slice, in rank order."""
    if len(shards) == 1 or kind == "replicated":
        return shards[0]
    if kind in ("vocab", "qkv", "column"):
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    if kind == "gated_column":
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown parallel kind {kind!r}")


# --------------------------------------------------------------------------- model loading


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module,
    arch: Qwen3Arch,
    read_hf: TensorReader,
    *,
    padded_vocab: int,
    tp_size: int,
    tp_rank: int,
    pp_size: int,
    pp_rank: int,
    ep_size: int = 1,
    ep_rank: int = 0,
    etp_size: int = 1,
    etp_rank: int = 0,
) -> list[str]:
    """Copy HF tensors into this rank's Megatron model (one parameter at a time); experts
    are this EP rank's, split over the expert-TP ranks.

    Returns the Megatron names that were loaded; raises ValueError on a shape mismatch.
    """
    offset = layer_offset(arch.num_layers, pp_size, pp_rank)
    first_expert = expert_offset(arch.num_experts, ep_size, ep_rank) if arch.is_moe else 0
    loaded = []
    for local_name, param in model.named_parameters():
        name = global_name(local_name, offset, first_expert)
        hf_names, kind = find_rule(arch, name)
        full = to_mcore(kind, [read_hf(h) for h in hf_names], arch, padded_vocab)
        shard = tp_shard(kind, full, *((etp_size, etp_rank) if is_expert(name) else (tp_size, tp_rank)))
        if shard.shape != param.shape:
            raise ValueError(
                f"{name}: HF tensors {list(hf_names)} give a TP shard of shape {tuple(shard.shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
        param.copy_(shard)
        loaded.append(name)
    return loaded
