"""Megatron-Core Qwen3-MoE after HF → mcore loading matches transformers'
`Qwen3MoeForCausalLM` at every expert layout.

Each layout (TP, EP, PP) runs on spawned gloo ranks through Megatron's pipeline schedule
(forward-only) with the all-to-all token dispatcher; the last stage gathers the
vocab-parallel logits over TP and compares them with transformers on the same random
weights (fp32, max abs diff ≤ 1e-4). The same workers check the fused vocab-parallel loss
on the MoE model's final hidden states against log-softmax of its full logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.helpers import VOCAB, checkpoint_tensors, pipeline_forward, tiny_moe_hf_model

SEQ, BATCH = 12, 2
WORLD_2 = [(1, 1, 1), (1, 2, 1), (2, 1, 1)]  # (tp, ep, pp): TP1 (as DP2), EP2, TP2 (experts at ETP2)
WORLD_4 = [(2, 2, 1), (1, 2, 2)]  # TP2×EP2, EP2×PP2
LAYOUTS = WORLD_2 + WORLD_4


def _parity_worker(rank: int, world_size: int, layouts: list[tuple[int, int, int]]) -> dict:
    return {layout: _parity_at_layout(*layout) for layout in layouts}


def _parity_at_layout(tp: int, ep: int, pp: int) -> dict | None:
    from sdpg_megatron.model.hf_mapping import load_hf_weights
    from sdpg_megatron.model.provider import model_provider, transformer_config
    from sdpg_megatron.parallel import padded_vocab_size, vocab_parallel_token_stats
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel

    etp = tp if ep == 1 else 1  # without EP, Megatron needs experts split like the dense layers
    groups = initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                 expert_tensor_parallel=etp, seed=0)
    try:
        arch, hf_model = tiny_moe_hf_model()
        tensors = checkpoint_tensors(hf_model)
        config = transformer_config(arch, tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                    expert_tensor_parallel=etp)
        model = model_provider(arch, config, pre_process=groups.is_first_stage,
                               post_process=groups.is_last_stage).eval()
        load_hf_weights(model, arch, tensors.__getitem__, padded_vocab=padded_vocab_size(VOCAB, tp),
                        tp_size=tp, tp_rank=groups.tp_rank, pp_size=pp, pp_rank=groups.pp_rank,
                        ep_size=groups.ep_size, ep_rank=groups.ep_rank, etp_size=etp, etp_rank=groups.etp_rank)
        local_experts = sum(1 for name, _ in model.named_parameters() if name.endswith("linear_fc2.weight")
                            and ".layers.0." in name)
        input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
        logits_shard = pipeline_forward(model, config, input_ids, return_hidden=False)
        hidden = pipeline_forward(model, config, input_ids, return_hidden=True)
        if not groups.is_last_stage:
            return None
        parts = [torch.empty_like(logits_shard) for _ in range(tp)]
        dist.all_gather(parts, logits_shard.contiguous(), group=groups.tp_group)
        logits = torch.cat(parts, dim=-1)
        with torch.no_grad():
            expected = hf_model(input_ids).logits
        targets = torch.roll(input_ids, -1, dims=1).t().reshape(-1)
        stats = vocab_parallel_token_stats(
            hidden.reshape(-1, hidden.shape[-1]), model.output_weight().detach(), targets,
            group=groups.loss_tp_group, vocab_size=VOCAB, chunk_size=7,
        )
        full_logp = torch.log_softmax(logits[..., :VOCAB].double(), dim=-1).transpose(0, 1).reshape(-1, VOCAB)
        return {
            "local_experts": local_experts,
            "ep_size": groups.ep_size,
            "logits_max_abs_diff": (logits[..., :VOCAB] - expected).abs().max().item(),
            "fused_logprob_max_abs_diff": (stats.logprobs.double()
                                           - full_logp.gather(1, targets[:, None]).squeeze(1)).abs().max().item(),
        }
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def parity_results():
    per_rank = run_distributed(_parity_worker, 2, WORLD_2)
    per_rank_4 = run_distributed(_parity_worker, 4, WORLD_4)
    results = {layout: [r[layout] for r in per_rank] for layout in WORLD_2}
    results.update({layout: [r[layout] for r in per_rank_4] for layout in WORLD_4})
    return results


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}ep{l[1]}pp{l[2]}")
def test_megatron_moe_logits_match_transformers(parity_results, layout):
    tp, ep, pp = layout
    world = 2 if layout in WORLD_2 else 4
    last_stage = [r for r in parity_results[layout] if r]
    print(f"tp{tp} ep{ep} pp{pp}: max |Δlogits| {max(r['logits_max_abs_diff'] for r in last_stage):.2e}, "
          f"max |Δ fused log-prob| {max(r['fused_logprob_max_abs_diff'] for r in last_stage):.2e}")
    assert len(last_stage) == world // pp  # every last-stage rank reported
    for result in last_stage:
        assert result["ep_size"] == ep
        assert result["local_experts"] == 8 // ep  # the experts really are split
        assert result["logits_max_abs_diff"] <= 1e-4, result


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}ep{l[1]}pp{l[2]}")
def test_fused_loss_on_moe_hidden_states_matches_full_logits(parity_results, layout):
    for result in (r for r in parity_results[layout] if r):
        assert result["fused_logprob_max_abs_diff"] <= 1e-4, result


def test_expert_layout_that_does_not_divide_is_rejected():
    from sdpg_megatron.model.provider import check_layout
    from sdpg_megatron.model.qwen3 import qwen3_4b, qwen3_30b_a3b, qwen3_moe_tiny

    with pytest.raises(ValueError, match="num_experts=8"):
        check_layout(qwen3_moe_tiny(), tensor_parallel=1, pipeline_parallel=1, expert_parallel=3)
    with pytest.raises(ValueError, match="moe_ffn_hidden_size=768"):
        check_layout(qwen3_30b_a3b(), tensor_parallel=1, pipeline_parallel=1, expert_parallel=2, expert_tensor_parallel=5)
    with pytest.raises(ValueError, match="dense"):
        check_layout(qwen3_4b(), tensor_parallel=1, pipeline_parallel=1, expert_parallel=2)
