"""A Qwen3-MoE training step at EP2, TP2×EP2 (sequence parallel) and EP2×PP2 equals the
TP1 step: loss, grad norm, the load-balancing loss reported on its own, and updated
weights of an expert that lives on the second EP rank and of a router.

Each layout starts from the same HF weights (`Qwen3MoeForCausalLM`, fp32), runs one
optimizer step (Megatron's schedule, all-to-all token dispatch and the distributed
optimizer on gloo) on the same global batch with a masked token-mean NLL from the fused
vocab-parallel loss; the router's load-balancing loss enters with its coefficient.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.helpers import VOCAB, checkpoint_tensors, nll_train_step, tiny_moe_hf_model

GLOBAL_BATCH, SEQ = 4, 16  # SEQ: sequence parallelism at TP2 splits it in halves
EXPERT_PROBE = "decoder.layers.1.mlp.experts.local_experts.6.linear_fc1.weight"  # EP rank 1 at EP2
ROUTER_PROBE = "decoder.layers.0.mlp.router.weight"
BASELINE = (1, 1, 1, 1)  # (world, tp, ep, pp)
# TP2 without expert parallelism splits each expert over the TP ranks (ETP2, as Megatron requires at EP1)
LAYOUTS = {(2, 1, 2, 1): "ep2", (2, 2, 1, 1): "tp2-etp2-sp", (4, 2, 2, 1): "tp2-ep2-sp", (4, 1, 2, 2): "ep2-pp2"}


def _batch():
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)
    mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=generator) > 0.3).float()
    return tokens, mask


def _step_at_layout(tp: int, ep: int, pp: int) -> dict:
    from sdpg_megatron.config import OptimizerConfig, ParallelConfig
    from sdpg_megatron.model.hf_mapping import (expert_offset, find_rule, global_name, layer_offset, load_hf_weights,
                                                tp_gather)
    from sdpg_megatron.model.training import build_policy
    from sdpg_megatron.parallel import padded_vocab_size
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel

    etp = tp if ep == 1 else 1
    groups = initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                 expert_tensor_parallel=etp, seed=0)
    try:
        arch, hf_model = tiny_moe_hf_model()
        tensors = checkpoint_tensors(hf_model)
        settings = OptimizerConfig(lr=1e-3, lr_warmup_steps=0, use_distributed_optimizer=True)
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                  expert_tensor_parallel=etp, sequence_parallel=tp > 1)
        policy = build_policy(arch, groups, settings, parallel=parallel, load_weights=lambda m: load_hf_weights(
            m, arch, tensors.__getitem__, padded_vocab=padded_vocab_size(VOCAB, tp), tp_size=tp,
            tp_rank=groups.tp_rank, pp_size=pp, pp_rank=groups.pp_rank, ep_size=ep, ep_rank=groups.ep_rank,
            etp_size=etp, etp_rank=groups.etp_rank))
        result, loss = nll_train_step(policy, groups, arch, *_batch())
        report = {"grad_norm": result.grad_norm, "updated": result.update_successful, **result.router}
        if loss is not None:
            report["loss"] = loss
        offset = layer_offset(arch.num_layers, pp, groups.pp_rank)
        first_expert = expert_offset(arch.num_experts, ep, groups.ep_rank)
        held = {name: param.detach().clone() for local, param in policy.module.named_parameters()
                if (name := global_name(local, offset, first_expert)) in (EXPERT_PROBE, ROUTER_PROBE)}
        if EXPERT_PROBE in held and etp > 1:  # the whole expert from its expert-TP shards
            shards = [torch.empty_like(held[EXPERT_PROBE]) for _ in range(etp)]
            dist.all_gather(shards, held[EXPERT_PROBE], group=groups.etp_group)
            held[EXPERT_PROBE] = tp_gather(find_rule(arch, EXPERT_PROBE)[1], shards)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, held)
        report["probes"] = {name: next(h[name] for h in everyone if name in h) for name in (EXPERT_PROBE, ROUTER_PROBE)}
        report["holds_expert_probe"] = EXPERT_PROBE in held
        return report
    finally:
        destroy_parallel()


def _worker(rank, world_size, layouts):
    return {layout: _step_at_layout(*layout) for layout in layouts}


@pytest.fixture(scope="module")
def moe_steps():
    results = {}
    for world in (1, 2, 4):
        layouts = [layout[1:] for layout in (BASELINE, *LAYOUTS) if layout[0] == world]
        per_rank = run_distributed(_worker, world, layouts)
        for layout in layouts:
            results[(world, *layout)] = [r[layout] for r in per_rank]
    return results


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS.values()))
def test_moe_step_matches_tp1(moe_steps, layout):
    (baseline,) = moe_steps[BASELINE]
    reports = moe_steps[layout]
    print(LAYOUTS[layout], {k: v for k, v in reports[-1].items() if k != "probes"})
    assert all(r["updated"] for r in reports)
    for report in reports:
        assert report["grad_norm"] == pytest.approx(baseline["grad_norm"], rel=1e-5)
        assert report["moe/load_balancing_loss"] == pytest.approx(baseline["moe/load_balancing_loss"], rel=1e-6)
        for name, value in report["probes"].items():
            # Adam's first step is lr·g/(|g| + eps): allow 5% of one step (lr) for fp32 order effects
            torch.testing.assert_close(value, baseline["probes"][name], rtol=1e-5, atol=5e-5)
    losses = [r["loss"] for r in reports if "loss" in r]
    assert losses and all(loss == pytest.approx(baseline["loss"], rel=1e-6) for loss in losses)
    world, tp, ep, pp = layout
    # one copy (ETP shards count once each) per expert-data-parallel replica of the probe's stage
    assert sum(r["holds_expert_probe"] for r in reports) == world // (ep * pp)


def test_moe_step_moves_experts_and_router(moe_steps):
    from sdpg_megatron.model.hf_mapping import find_rule, to_mcore

    (baseline,) = moe_steps[BASELINE]
    arch, hf_model = tiny_moe_hf_model()
    tensors = checkpoint_tensors(hf_model)
    for name in (EXPERT_PROBE, ROUTER_PROBE):
        hf_names, kind = find_rule(arch, name)
        before = to_mcore(kind, [tensors[n] for n in hf_names], arch, 0)
        assert (baseline["probes"][name] - before).abs().max() > 1e-4  # lr 1e-3 Adam moved it
    # the load-balancing loss is E·Σ f_i·P_i ≥ 1 with equality only for perfectly even routing
    assert 1.0 <= baseline["moe/load_balancing_loss"] < arch.num_experts / arch.experts_per_token


def test_experts_without_expert_parallelism_split_like_dense_layers():
    from sdpg_megatron.model.provider import check_layout
    from sdpg_megatron.model.qwen3 import qwen3_moe_tiny

    with pytest.raises(ValueError, match="parallel.expert_tensor_parallel must equal parallel.tensor_parallel=2"):
        check_layout(qwen3_moe_tiny(), tensor_parallel=2, pipeline_parallel=1, expert_parallel=1,
                     expert_tensor_parallel=1)
    check_layout(qwen3_moe_tiny(), tensor_parallel=2, pipeline_parallel=1, expert_parallel=2, expert_tensor_parallel=1)


def test_moe_training_at_tp2_needs_sequence_parallelism():
    from sdpg_megatron.config import OptimizerConfig, ParallelConfig
    from sdpg_megatron.model.qwen3 import qwen3_moe_tiny
    from sdpg_megatron.model.training import _transformer_config
    from sdpg_megatron.parallel.groups import ParallelGroups

    groups = ParallelGroups(None, None, None, tp_size=2, tp_rank=0, pp_size=1, pp_rank=0, dp_size=1, dp_rank=0)
    with pytest.raises(ValueError, match="parallel.sequence_parallel=true"):
        _transformer_config(qwen3_moe_tiny(), groups, torch.float32, ParallelConfig(tensor_parallel=2),
                            training=True, variable_seq_lengths=False)
    assert OptimizerConfig  # the settings a policy would be built with
