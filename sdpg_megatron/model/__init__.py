"""Qwen3 presets, the Megatron-Core model provider and the HF ↔ Megatron table."""

from sdpg_megatron.model.qwen3 import QWEN3_PRESETS, Qwen3Arch, from_hf_config, qwen3_preset, to_hf_config

__all__ = ["QWEN3_PRESETS", "Qwen3Arch", "from_hf_config", "qwen3_preset", "to_hf_config"]
