"""Dynamic batching: micro-batches cut by a token budget from length-sorted samples, each
padded only to its own longest row (`schedule.max_tokens_per_micro_batch`).

The loss is a token sum normalised by the mini-batch's token count, so regrouping samples
must not change the step: at TP2, DP2 and PP2 (2 gloo ranks) one SDPG update with the π_old
recompute and the teacher on the gated samples only gives the same loss, metrics,
gradient norm and weights (every stage's) as micro-batches of two padded to the step's
longest sequence. Under PP the stages exchange each micro-batch's activation shape first
(Megatron's `variable_seq_lengths`), so micro-batches differ in length and in rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import last_stage_report as _last, run_distributed
from tests.helpers import random_step_batch

VOCAB = 512
# (advantage, response length): a long tail among short responses
SAMPLES = [(1.0, 3), (0.5, 40), (-1.0, 2), (0.8, 5), (0.0, 4), (-0.3, 33), (0.9, 0), (-0.2, 6)]
BUDGET = 64


def _batch():
    return random_step_batch(VOCAB, SAMPLES, seed=7, prompt_lengths=[4 + index % 3 for index in range(len(SAMPLES))])


def test_token_budget_groups_cover_every_sample_within_the_budget():
    from sdpg_megatron.experience import micro_batches, padded_length, sequence_lengths, token_budget_groups

    batch, advantages = _batch()
    ids = list(range(len(SAMPLES)))
    groups = token_budget_groups(batch, ids, BUDGET)
    assert sorted(i for g in groups for i in g) == ids
    for group in groups:
        width = max(padded_length(max(sequence_lengths(batch, i))) for i in group)
        assert len(group) * width <= BUDGET or len(group) == 1
    mbs = micro_batches(batch, ids, 2, advantages, 0, max_tokens=BUDGET)
    real = sum(sum(sequence_lengths(batch, i)[0] for i in g) for g in groups)
    padded = sum(mb.tokens.numel() for mb in mbs)
    fixed = sum(mb.tokens.numel() for mb in micro_batches(batch, ids, 2, advantages, 0))
    assert padded < fixed  # the long rows no longer set every micro-batch's width
    assert padded / real < 1.6 < fixed / real
    assert [mb.tokens.shape[1] % 8 for mb in mbs] == [0] * len(mbs)


def test_pipeline_parallel_takes_the_budget():
    from sdpg_megatron.config import Config, validate

    config = Config()
    config.model.hf_dir, config.data.train_files = "m", ("t.parquet",)
    config.schedule.max_tokens_per_micro_batch = 4096
    config.parallel.pipeline_parallel = 2
    assert validate(config).schedule.max_tokens_per_micro_batch == 4096
    config.schedule.max_tokens_per_micro_batch = 4
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        validate(config)


def _step(tp: int, pp: int, budget: int | None) -> dict:
    from sdpg_megatron.algo import teacher_sample_mask
    from sdpg_megatron.config import Config
    from sdpg_megatron.presets import sdpg_urkl
    from sdpg_megatron.experience import micro_batches
    from sdpg_megatron.model.qwen3 import qwen3_tiny
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel
    from sdpg_megatron.passes import ModelPasses

    groups = initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=0)
    try:
        config = Config()
        config.algorithm = sdpg_urkl()
        config.algorithm.beta_base, config.algorithm.beta_schedule = 0.5, "constant"
        config.algorithm.anchor, config.algorithm.alpha = "none", 0.0
        config.model.loss_backend = "torch"
        config.optimizer.lr, config.optimizer.lr_warmup_steps = 1e-3, 0
        config.schedule.max_tokens_per_micro_batch = budget
        passes = ModelPasses(config, groups, None, arch=qwen3_tiny(vocab_size=VOCAB, num_layers=2))
        batch, advantages = _batch()
        per_rank = len(SAMPLES) // groups.dp_size
        ids = list(range(groups.dp_rank * per_rank, (groups.dp_rank + 1) * per_rank))
        shapes = micro_batches(batch, ids, 2, torch.zeros(len(SAMPLES)), 0, max_tokens=budget)
        old = passes.old_logprobs(batch, shapes)
        mbs = micro_batches(batch, ids, 2, advantages, 0, max_tokens=budget)
        teacher = passes.teacher_states(batch, mbs, teacher_sample_mask(config.algorithm, advantages, 1, 10))
        result = passes.train(batch, mbs, 1, teacher, None, first_minibatch=True, old=old)
        weights = torch.cat([p.detach().flatten() for p in passes.policy.module.parameters()]).double()
        weight_sums = torch.stack([weights.sum(), weights.abs().sum()])
        dist.all_reduce(weight_sums)  # every rank's shards and stages
        report = {"grad_norm": result.grad_norm, "weights_sum": weight_sums[0].item(), "weights_abs": weight_sums[1].item(),
                  "last": groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0,
                  "computed": sum(mb.tokens.numel() for mb in mbs), "micro_batches": len(mbs)}
        report["metrics"] = passes.reduce_metrics([result])  # token-weighted means over the step (collective)
        return report
    finally:
        destroy_parallel()


def _worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    return {f"tp{tp}pp{pp}/{name}": _step(tp, pp, budget) for tp, pp in ((2, 1), (1, 1), (1, 2))
            for name, budget in (("padded", None), ("budget", BUDGET))}


@pytest.fixture(scope="module")
def reports():
    return run_distributed(_worker, 2, timeout_s=600)


@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp1", "tp1pp2"])  # tp1pp1: DP2
def test_dynamic_batching_gives_the_same_step(reports, layout):
    padded, budget = _last(reports, f"{layout}/padded"), _last(reports, f"{layout}/budget")
    assert budget["micro_batches"] != padded["micro_batches"] or budget["computed"] < padded["computed"]
    assert budget["computed"] < padded["computed"]
    assert budget["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-5)
    assert budget["weights_sum"] == pytest.approx(padded["weights_sum"], rel=1e-7)
    assert budget["weights_abs"] == pytest.approx(padded["weights_abs"], rel=1e-7)
    assert budget["metrics"].keys() == padded["metrics"].keys()
    for key, value in padded["metrics"].items():  # token-weighted means: independent of the grouping
        assert budget["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert padded["grad_norm"] > 0 and padded["metrics"]["opd_kl"] > 0 and padded["metrics"]["train_tokens"] == 93
