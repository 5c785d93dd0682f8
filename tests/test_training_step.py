"""A Megatron training step at TP2, PP2, TP2×PP2 and DP2 equals the TP1 step, and so
does every kind of activation recomputation, and sequence parallelism at TP2 and TP2×PP2.

Each layout starts from the same HF weights, runs one optimizer step (Megatron's
schedule, distributed optimizer on gloo) on the same global batch with a masked
token-mean NLL computed by the fused vocab-parallel loss, and reports the loss, the grad
norm and a few updated parameters gathered back to global shape.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.helpers import VOCAB, tiny_hf_model

GLOBAL_BATCH, SEQ = 4, 10
PROBE = "decoder.layers.3.mlp.linear_fc2.weight"  # a row-parallel weight on the last stage


def _batch():
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)
    mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=generator) > 0.3).float()
    return tokens, mask


def _step_at_layout(tp: int, pp: int, distributed_optimizer: bool, recompute: tuple = ("none",),
                    sequence_parallel: bool = False) -> dict:
    from sdpg_megatron.model.hf_mapping import find_rule, global_name, layer_offset, load_hf_weights, tp_gather
    from sdpg_megatron.config import OptimizerConfig, ParallelConfig
    from sdpg_megatron.model.training import build_policy, train_step
    from sdpg_megatron.parallel import padded_vocab_size, vocab_parallel_token_stats
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel

    groups = initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=0)
    try:
        arch, hf_model = tiny_hf_model(tied=True)
        state = hf_model.state_dict()
        settings = OptimizerConfig(lr=1e-3, lr_warmup_steps=0, use_distributed_optimizer=distributed_optimizer)
        granularity, method, num_layers = (*recompute, "uniform", 1)[:3]
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sequence_parallel,
                                  recompute_granularity=granularity, recompute_method=method,
                                  recompute_num_layers=num_layers)
        policy = build_policy(arch, groups, settings, parallel=parallel, load_weights=lambda m: load_hf_weights(
            m, arch, state.__getitem__, padded_vocab=padded_vocab_size(VOCAB, tp),
            tp_size=tp, tp_rank=groups.tp_rank, pp_size=pp, pp_rank=groups.pp_rank))
        norm_rows = []  # sequence positions a norm sees: SEQ, or SEQ / tp with sequence parallelism
        policy.module.decoder.layers[0].input_layernorm.register_forward_hook(
            lambda module, inputs, output: norm_rows.append(inputs[0].shape[0]))
        tokens, mask = _batch()
        per_rank = GLOBAL_BATCH // groups.dp_size
        rows = range(groups.dp_rank * per_rank, (groups.dp_rank + 1) * per_rank)
        microbatches = iter([(tokens[r : r + 1], mask[r : r + 1]) for r in rows])
        saved_bytes = []

        def forward_step(data_iterator, model):
            batch_tokens, batch_mask = next(data_iterator)
            inputs, targets = batch_tokens[:, :-1], batch_tokens[:, 1:]
            positions = torch.arange(SEQ)[None]
            saved = _saved_bytes_during(lambda: model(inputs, positions, None, return_hidden=True))
            hidden = saved.pop("result")
            saved_bytes.append(saved["bytes"])

            def loss_func(hidden_states):
                stats = vocab_parallel_token_stats(
                    hidden_states.transpose(0, 1).reshape(-1, arch.hidden_size),
                    model.module.output_weight(), targets.reshape(-1),
                    group=groups.loss_tp_group, vocab_size=VOCAB,
                )
                token_mask = batch_mask.reshape(-1)
                loss_sum = -(stats.logprobs * token_mask).sum()
                num_tokens = token_mask.sum().to(torch.int)
                return loss_sum, num_tokens, {"loss_sum": loss_sum.detach(), "num_tokens": num_tokens}

            return hidden, loss_func

        result = train_step(policy, forward_step, microbatches, num_microbatches=per_rank,
                            seq_length=SEQ, micro_batch_size=1)
        report = {"grad_norm": result.grad_norm, "updated": result.update_successful,
                  "activation_bytes": max(saved_bytes), "norm_rows": set(norm_rows),
                  "norm_weight_sequence_parallel": policy.module.decoder.layers[0].input_layernorm.weight.sequence_parallel}
        if groups.is_last_stage:
            totals = torch.tensor([sum(float(l["loss_sum"]) for l in result.losses),
                                   sum(int(l["num_tokens"]) for l in result.losses)], dtype=torch.float64)
            dist.all_reduce(totals, group=groups.dp_group)
            report["loss"] = (totals[0] / totals[1]).item()
            offset = layer_offset(arch.num_layers, pp, groups.pp_rank)
            for local_name, param in policy.module.named_parameters():
                if global_name(local_name, offset) == PROBE:
                    shards = [torch.empty_like(param) for _ in range(tp)]
                    dist.all_gather(shards, param.detach().contiguous(), group=groups.tp_group)
                    report["probe"] = tp_gather(find_rule(arch, PROBE)[1], shards)
        return report
    finally:
        destroy_parallel()


def _saved_bytes_during(forward) -> dict:
    """forward()'s result and the bytes of the activations autograd saved while it ran
    (tensors saved for backward that are not parameters)."""
    total = [0]

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    return {"result": result, "bytes": total[0]}


def _worker(rank, world_size, layouts):
    return {layout: _step_at_layout(*layout) for layout in layouts}


@pytest.fixture(scope="module")
def step_results():
    results = {}
    for world, layouts in ((1, [(1, 1, False), (1, 1, True), *RECOMPUTE_TP1]),
                           (2, [(2, 1, True), (1, 2, True), (1, 1, True), SEQUENCE_PARALLEL_TP2]),
                           (4, [(2, 2, True), RECOMPUTE_TP2PP2, SEQUENCE_PARALLEL_TP2PP2])):
        per_rank = run_distributed(_worker, world, layouts)
        for layout in layouts:
            results[(world, *layout)] = [r[layout] for r in per_rank]
    return results


def _last_stage(reports):
    return [r for r in reports if "loss" in r]


RECOMPUTE_TP1 = [(1, 1, True, ("full", "uniform", 2)), (1, 1, True, ("full", "block", 3)), (1, 1, True, ("selective",))]
RECOMPUTE_TP2PP2 = (2, 2, True, ("full", "uniform", 1))
SEQUENCE_PARALLEL_TP2 = (2, 1, True, ("none",), True)
SEQUENCE_PARALLEL_TP2PP2 = (2, 2, True, ("full", "uniform", 1), True)  # with recomputation
LAYOUT_IDS = {
    (1, 1, 1, True): "tp1-distopt", (2, 2, 1, True): "tp2", (2, 1, 2, True): "pp2",
    (2, 1, 1, True): "dp2", (4, 2, 2, True): "tp2pp2",
    **{(1, *layout): "tp1-" + "-".join(map(str, layout[3])) for layout in RECOMPUTE_TP1},
    (4, *RECOMPUTE_TP2PP2): "tp2pp2-full-uniform-1",
    (2, *SEQUENCE_PARALLEL_TP2): "tp2-sp", (4, *SEQUENCE_PARALLEL_TP2PP2): "tp2pp2-sp-full-uniform-1",
}


@pytest.mark.parametrize("layout", list(LAYOUT_IDS), ids=list(LAYOUT_IDS.values()))
def test_step_matches_tp1(step_results, layout):
    (baseline,) = step_results[(1, 1, 1, False)]
    reports = step_results[layout]
    assert all(r["updated"] for r in reports)
    for report in reports:
        assert report["grad_norm"] == pytest.approx(baseline["grad_norm"], rel=1e-5)
    for report in _last_stage(reports):
        assert report["loss"] == pytest.approx(baseline["loss"], rel=1e-6)
        # Adam's first step is lr·g/(|g| + eps): entries whose gradient is near eps amplify
        # fp32 summation-order differences between layouts, so allow 5% of one step (lr).
        torch.testing.assert_close(report["probe"], baseline["probe"], rtol=1e-5, atol=5e-5)


def test_sequence_parallel_shards_the_sequence(step_results):
    """The SP layouts equal TP1 (test_step_matches_tp1) while each rank's norms see half of
    every sequence, and their weights are marked for Megatron's TP all-reduce."""
    for world, layout in ((2, SEQUENCE_PARALLEL_TP2), (4, SEQUENCE_PARALLEL_TP2PP2)):
        for report in step_results[(world, *layout)]:
            assert report["norm_rows"] == {SEQ // 2} and report["norm_weight_sequence_parallel"] is True
    for report in step_results[(2, 2, 1, True)]:  # TP2 without it: whole sequences, unmarked
        assert report["norm_rows"] == {SEQ} and report["norm_weight_sequence_parallel"] is False


def test_recomputation_keeps_fewer_activations(step_results):
    """Same step (test_step_matches_tp1), fewer saved activations: full recomputation keeps
    only each unit's input; selective drops core attention's saved tensors."""
    (plain,) = step_results[(1, 1, 1, True)]
    saved = {layout[3]: step_results[(1, *layout)][0]["activation_bytes"] for layout in RECOMPUTE_TP1}
    print({"none": plain["activation_bytes"], **saved})
    assert saved[("full", "uniform", 2)] < 0.5 * plain["activation_bytes"]
    assert saved[("full", "uniform", 2)] < saved[("full", "block", 3)] < plain["activation_bytes"]
    assert saved[("selective",)] < plain["activation_bytes"]


def test_step_changes_the_weights(step_results):
    from sdpg_megatron.model.hf_mapping import find_rule, to_mcore

    (baseline,) = step_results[(1, 1, 1, False)]
    arch, hf_model = tiny_hf_model(tied=True)
    hf_names, kind = find_rule(arch, PROBE)
    before = to_mcore(kind, [hf_model.state_dict()[n] for n in hf_names], arch, 0)
    assert (baseline["probe"] - before).abs().max() > 1e-4  # lr 1e-3 Adam moves every entry
    assert baseline["grad_norm"] > 0


def _nan_step_worker(rank: int, world_size: int) -> dict:
    """DP2: rank 1's loss is NaN in the first step, so its gradients are; the step must be
    skipped on every rank and leave weights, Adam state and the LR schedule untouched."""
    from sdpg_megatron.config import OptimizerConfig
    from sdpg_megatron.model.hf_mapping import load_hf_weights
    from sdpg_megatron.model.training import build_policy, train_step
    from sdpg_megatron.parallel import padded_vocab_size
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel

    groups = initialize_parallel(tensor_parallel=1, pipeline_parallel=1, seed=0)
    try:
        arch, hf_model = tiny_hf_model(tied=True)
        state = hf_model.state_dict()
        policy = build_policy(arch, groups, OptimizerConfig(lr=1e-3, lr_warmup_steps=0), load_weights=lambda m: load_hf_weights(
            m, arch, state.__getitem__, padded_vocab=padded_vocab_size(VOCAB, 1), tp_size=1, tp_rank=0, pp_size=1, pp_rank=0))
        tokens, _ = _batch()

        def step(poison: bool):
            def forward_step(data_iterator, model):
                batch_tokens = next(data_iterator)
                logits = model(batch_tokens, torch.arange(SEQ + 1)[None], None)

                def loss_func(output):
                    scale = float("nan") if poison and rank == 1 else 1.0
                    return output.float().mean() * scale, torch.tensor(1, dtype=torch.int), {}

                return logits, loss_func

            return train_step(policy, forward_step, iter([tokens[rank : rank + 1]]), num_microbatches=1,
                              seq_length=SEQ + 1, micro_batch_size=1)

        before = [p.detach().clone() for p in policy.module.parameters()]
        schedule_before = policy.scheduler.num_steps
        skipped = step(poison=True)
        unchanged = all(torch.equal(a, p) for a, p in zip(before, policy.module.parameters()))
        adam_states = len(policy.optimizer.optimizer.state)
        schedule_after_skip = policy.scheduler.num_steps
        applied = step(poison=False)
        moved = any(not torch.equal(a, p) for a, p in zip(before, policy.module.parameters()))
        return {"skipped": skipped.update_successful, "unchanged": unchanged, "adam_states": adam_states,
                "schedule": (schedule_before, schedule_after_skip), "applied": applied.update_successful, "moved": moved}
    finally:
        destroy_parallel()


def test_nonfinite_gradients_skip_the_step_on_every_rank():
    for report in run_distributed(_nan_step_worker, 2):
        assert report["skipped"] is False and report["unchanged"] and report["adam_states"] == 0
        assert report["schedule"][0] == report["schedule"][1]
        assert report["applied"] is True and report["moved"]
