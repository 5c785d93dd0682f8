"""Qwen3 presets against the published configs (config.json of each Qwen3 release)."""

import pytest

from sdpg_megatron.model.qwen3 import QWEN3_PRESETS, from_hf_config, qwen3_preset, qwen3_tiny, to_hf_config

# (layers, hidden, heads, kv heads, intermediate, tied, total params, non-embedding params)
# as published on the Qwen3 model cards and in their config.json files.
PUBLISHED = {
    "qwen3-0.6b": (28, 1024, 16, 8, 3072, True, 0.6e9, 0.44e9),
    "qwen3-1.7b": (28, 2048, 16, 8, 6144, True, 1.7e9, 1.4e9),
    "qwen3-4b": (36, 2560, 32, 8, 9728, True, 4.0e9, 3.6e9),
    "qwen3-8b": (36, 4096, 32, 8, 12288, False, 8.2e9, 6.95e9),
    "qwen3-14b": (40, 5120, 40, 8, 17408, False, 14.8e9, 13.2e9),
    "qwen3-32b": (64, 5120, 64, 8, 25600, False, 32.8e9, 31.2e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_published_config(name):
    layers, hidden, heads, groups, ffn, tied, total, non_embedding = PUBLISHED[name]
    arch = qwen3_preset(name)
    assert (arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.num_query_groups,
            arch.ffn_hidden_size, arch.tied_embeddings) == (layers, hidden, heads, groups, ffn, tied)
    assert arch.kv_channels == 128 and arch.vocab_size == 151_936 and arch.rope_base == 1e6
    # The non-embedding counts are published to 2-3 significant digits: within 1%.
    assert arch.num_parameters(include_embeddings=False) == pytest.approx(non_embedding, rel=0.01)
    # Totals are rounded harder on the cards ("1.7B" is 1.72B): within 1.5%.
    assert arch.num_parameters() == pytest.approx(total, rel=0.015)


def test_hf_config_round_trip():
    for name in QWEN3_PRESETS:
        arch = qwen3_preset(name)
        assert from_hf_config(to_hf_config(arch)) == arch


def test_transformers_accepts_the_config():
    from transformers import Qwen3Config

    config = Qwen3Config(**to_hf_config(qwen3_tiny()))
    assert config.head_dim == 64 and config.num_key_value_heads == 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "only Qwen3"),
        ({"model_type": "qwen3_moe"}, "num_experts"),  # a dense config relabelled: no expert keys
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_non_qwen3_config_is_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        from_hf_config({**to_hf_config(qwen3_tiny()), **change})


# Qwen3-MoE: (layers, hidden, heads, kv heads, experts, top-k, expert FFN, total, activated,
# non-embedding) from the model cards and config.json of Qwen3-30B-A3B and Qwen3-235B-A22B.
PUBLISHED_MOE = {
    "qwen3-30b-a3b": (48, 2048, 32, 4, 128, 8, 768, 30.5e9, 3.3e9, 29.9e9),
    "qwen3-235b-a22b": (94, 4096, 64, 4, 128, 8, 1536, 235e9, 22e9, 234e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MOE))
def test_moe_preset_matches_published_config(name):
    layers, hidden, heads, groups, experts, topk, expert_ffn, total, active, non_embedding = PUBLISHED_MOE[name]
    arch = qwen3_preset(name)
    assert (arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.num_query_groups, arch.num_experts,
            arch.experts_per_token, arch.moe_ffn_hidden_size) == (layers, hidden, heads, groups, experts, topk, expert_ffn)
    assert arch.norm_topk_prob and arch.router_aux_loss_coef == 0.001 and not arch.tied_embeddings
    assert arch.kv_channels == 128 and arch.vocab_size == 151_936 and arch.max_position_embeddings == 40_960
    assert arch.num_parameters() == pytest.approx(total, rel=0.01)
    assert arch.active_parameters() == pytest.approx(active, rel=0.02)
    assert arch.num_parameters(include_embeddings=False) == pytest.approx(non_embedding, rel=0.01)


def test_transformers_accepts_the_moe_config():
    from transformers import Qwen3MoeConfig

    from sdpg_megatron.model.qwen3 import qwen3_moe_tiny

    config = Qwen3MoeConfig(**to_hf_config(qwen3_moe_tiny()))
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (8, 2, 64)
    assert config.norm_topk_prob and config.decoder_sparse_step == 1 and config.mlp_only_layers == []


@pytest.mark.parametrize("change, message", [
    ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ({"mlp_only_layers": [0]}, "mlp_only_layers"),
    ({"num_experts_per_tok": 9}, "experts_per_token=9"),
])
def test_moe_variants_not_built_here_are_rejected(change, message):
    from sdpg_megatron.model.qwen3 import qwen3_moe_tiny

    with pytest.raises(ValueError, match=message):
        from_hf_config({**to_hf_config(qwen3_moe_tiny()), **change})


def test_missing_keys_are_named():
    config = to_hf_config(qwen3_tiny())
    del config["num_hidden_layers"]
    with pytest.raises(ValueError, match="num_hidden_layers"):
        from_hf_config(config)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown"):
        qwen3_preset("qwen3-3b")
