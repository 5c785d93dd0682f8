"""Megatron-Core Qwen3 after HF → mcore loading matches transformers at every layout.

Each layout runs on spawned gloo ranks through Megatron's own pipeline schedule
(forward-only); the last stage gathers the vocab-parallel logits over TP and compares them
with `Qwen3ForCausalLM` on the same random weights (fp32, max abs diff ≤ 1e-4). The same
workers check that the fused vocab-parallel loss, fed by the model's final hidden states
and output-weight shard, reproduces log-softmax of the model's full logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.helpers import VOCAB, pipeline_forward, tiny_hf_model

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (tp, pp)
SEQ, BATCH = 12, 2


def _parity_worker(rank: int, world_size: int, layouts: list[tuple[int, int]]) -> dict:
    """Runs several layouts in one spawn (a world of 2 serves TP1 as DP2, TP2 and PP2)."""
    return {(tp, pp): _parity_at_layout(tp, pp) for tp, pp in layouts}


def _parity_at_layout(tp: int, pp: int) -> dict:
    from sdpg_megatron.model.hf_mapping import load_hf_weights
    from sdpg_megatron.model.provider import model_provider, transformer_config
    from sdpg_megatron.parallel import padded_vocab_size, vocab_parallel_token_stats
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel

    groups = initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=0)
    results = {}
    try:
        for tied in (True, False):
            arch, hf_model = tiny_hf_model(tied)
            state = hf_model.state_dict()
            config = transformer_config(arch, tensor_parallel=tp, pipeline_parallel=pp)
            model = model_provider(arch, config, pre_process=groups.is_first_stage,
                                   post_process=groups.is_last_stage).eval()
            load_hf_weights(model, arch, state.__getitem__, padded_vocab=padded_vocab_size(VOCAB, tp),
                            tp_size=tp, tp_rank=groups.tp_rank, pp_size=pp, pp_rank=groups.pp_rank)
            input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
            logits_shard = pipeline_forward(model, config, input_ids, return_hidden=False)
            hidden = pipeline_forward(model, config, input_ids, return_hidden=True)
            if not groups.is_last_stage:
                continue
            parts = [torch.empty_like(logits_shard) for _ in range(tp)]
            dist.all_gather(parts, logits_shard.contiguous(), group=groups.tp_group)
            logits = torch.cat(parts, dim=-1)  # [b, s, V_padded]
            with torch.no_grad():
                expected = hf_model(input_ids).logits
            # Fused loss on hidden states [s, b, H] → tokens in [s·b] order.
            targets = torch.roll(input_ids, -1, dims=1).t().reshape(-1)
            stats = vocab_parallel_token_stats(
                hidden.reshape(-1, hidden.shape[-1]), model.output_weight().detach(), targets,
                group=groups.loss_tp_group, vocab_size=VOCAB, chunk_size=7,
            )
            full_logp = torch.log_softmax(logits[..., :VOCAB].double(), dim=-1).transpose(0, 1).reshape(-1, VOCAB)
            results[tied] = {
                "logits_max_abs_diff": (logits[..., :VOCAB] - expected).abs().max().item(),
                "fused_logprob_max_abs_diff": (stats.logprobs.double() - full_logp.gather(1, targets[:, None]).squeeze(1)).abs().max().item(),
            }
    finally:
        destroy_parallel()
    return results


@pytest.fixture(scope="module")
def parity_results():
    per_rank = run_distributed(_parity_worker, 2, [(1, 1), (2, 1), (1, 2)])
    per_rank_4 = run_distributed(_parity_worker, 4, [(2, 2)])
    results = {layout: [r[layout] for r in per_rank] for layout in [(1, 1), (2, 1), (1, 2)]}
    results[(2, 2)] = [r[(2, 2)] for r in per_rank_4]
    return results


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}pp{l[1]}")
def test_megatron_logits_match_transformers(parity_results, layout, tied):
    last_stage_ranks = [r for r in parity_results[layout] if r]
    tp, pp = layout
    data_parallel = (4 if layout == (2, 2) else 2) // (tp * pp)
    assert len(last_stage_ranks) == tp * data_parallel  # every last-stage rank reported
    for result in last_stage_ranks:
        assert result[tied]["logits_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}pp{l[1]}")
def test_fused_loss_on_model_hidden_states_matches_full_logits(parity_results, layout):
    for result in (r for r in parity_results[layout] if r):
        for tied in (True, False):
            assert result[tied]["fused_logprob_max_abs_diff"] <= 1e-4


def test_layout_that_does_not_divide_is_rejected():
    from sdpg_megatron.model.provider import check_layout
    from sdpg_megatron.model.qwen3 import qwen3_4b, qwen3_tiny

    with pytest.raises(ValueError, match="num_query_groups=8"):
        check_layout(qwen3_4b(), tensor_parallel=16, pipeline_parallel=1)
    with pytest.raises(ValueError, match="num_layers=4"):
        check_layout(qwen3_tiny(), tensor_parallel=1, pipeline_parallel=3)
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        check_layout(qwen3_tiny(), tensor_parallel=8, pipeline_parallel=1)
