"""The one Hugging Face ↔ Megatron-Core table for Qwen3.

Conversion (`tools/hf_to_mcore.py`, `tools/mcore_to_hf.py`) and, later, weight resharding
to vLLM all go through `RULES`. A rule names one Megatron parameter (global layer index,
local layer spec names), the Hugging Face tensors it is made of, how they combine, and how
the result is split over tensor-parallel ranks:

- vocab:        rows are vocabulary ids, padded with zero rows to the TP-padded vocab;
                TP splits rows (the column-parallel output layer / vocab-parallel embedding)
- qkv:          [q; k; v] interleaved per query group (group g: its q heads, k_g, v_g);
                TP splits rows, i.e. whole query groups
- gated_column: [gate; up] stacked; TP rank r holds [gate_r; up_r]
- column / row: TP splits rows / columns
- replicated:   norms, identical on every TP rank

The TE layer spec fuses the pre-attention and pre-MLP norms into the following linear
layer (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`); `te_alias` maps
those names onto the local spec's names used here.
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
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab"),
)

_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def te_alias(name: str) -> str:
    """A TE-spec parameter name in the local spec's naming (identity otherwise)."""
    match = _LAYER.match(name)
    if match and match.group(2) in _TE_ALIASES:
        return f"decoder.layers.{match.group(1)}.{_TE_ALIASES[match.group(2)]}"
    return name


def layer_offset(num_layers: int, pp_size: int, pp_rank: int) -> int:
    if num_layers % pp_size:
        raise ValueError(f"pipeline size {pp_size} does not divide num_layers={num_layers}")
    return pp_rank * (num_layers // pp_size)


def global_name(local_name: str, offset: int) -> str:
    """A stage-local Megatron name (`decoder.layers.3...`) with the global layer index."""
    local_name = te_alias(local_name)
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    return f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"


def rules_for(arch: Qwen3Arch) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(mcore name, hf names, kind) for every tensor of `arch`, layers expanded."""
    for rule in RULES:
        if rule.mcore == "output_layer.weight" and arch.tied_embeddings:
            continue
        layers = range(arch.num_layers) if "{i}" in rule.mcore else [None]
        for i in layers:
            yield (rule.mcore.format(i=i), tuple(h.format(i=i) for h in rule.hf), rule.kind)


def find_rule(arch: Qwen3Arch, mcore_name: str) -> tuple[tuple[str, ...], str]:
    """The HF sources and kind of a global Megatron name. With tied embeddings the last
    pipeline stage's `output_layer.weight` is the embedding's copy."""
    if mcore_name == "output_layer.weight" and arch.tied_embeddings:
        mcore_name = "embedding.word_embeddings.weight"
    match = _LAYER.match(mcore_name)
    pattern = f"decoder.layers.{{i}}.{match.group(2)}" if match else mcore_name
    for rule in RULES:
        if rule.mcore == pattern:
            index = int(match.group(1)) if match else None
            if index is not None and not 0 <= index < arch.num_layers:
                break
            return tuple(h.format(i=index) for h in rule.hf), rule.kind
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
) -> list[str]:
    """Copy HF tensors into this rank's Megatron model (one parameter at a time).

    Returns the Megatron names that were loaded; raises ValueError on a shape mismatch.
    """
    offset = layer_offset(arch.num_layers, pp_size, pp_rank)
    loaded = []
    for local_name, param in model.named_parameters():
        name = global_name(local_name, offset)
        hf_names, kind = find_rule(arch, name)
        full = to_mcore(kind, [read_hf(h) for h in hf_names], arch, padded_vocab)
        shard = tp_shard(kind, full, tp_size, tp_rank)
        if shard.shape != param.shape:
            raise ValueError(
                f"{name}: HF tensors {list(hf_names)} give a TP shard of shape {tuple(shard.shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
        param.copy_(shard)
        loaded.append(name)
    return loaded
