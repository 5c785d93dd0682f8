"""π_old recomputed by the trainer, the engine/trainer mismatch metric, truncated importance
sampling, and the learning rate of every update under both warm-up units.

At TP2, PP2 and DP2 (2 gloo ranks) and on one rank:
- the recompute pass gives exactly the log-probs of the first training forward (same
  weights), so a step against the recomputed π_old equals a step whose engine log-probs
  are those values (`old_logprobs="engine"`);
- with an injected engine/trainer mismatch δ per token, the mismatch metrics are mean |δ|
  and mean(e^−δ − 1 + δ), and with `tis_cap` the first update's loss is the hand-computed
  −Σ min(e^−δ, C)·A / N;
- every PPO update of rollout step k runs at lr·min(1, (k − 1)/10), on a policy that ran
  the earlier steps and on a fresh one (what a resumed run is).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed import last_stage_report as _last, run_distributed
from tests.helpers import random_step_batch

VOCAB = 256
ADVANTAGES = [1.0, -0.5, 0.8, -1.2]
LENGTHS = [5, 3, 4, 6]


def _batch():
    return random_step_batch(VOCAB, list(zip(ADVANTAGES, LENGTHS)), seed=5, hint_length=0, rollout_logprob=0.0)


def _passes(groups, optimizer=None, **algorithm):
    from sdpg_megatron.config import Config
    from sdpg_megatron.presets import grpo
    from sdpg_megatron.model.qwen3 import qwen3_tiny
    from sdpg_megatron.passes import ModelPasses

    config = Config()
    config.algorithm = grpo()
    config.algorithm.kl_in_reward_coef = 0.0  # outcome term only: the loss is checked by hand
    for key, value in algorithm.items():
        setattr(config.algorithm, key, value)
    config.model.loss_backend = "torch"
    config.optimizer = optimizer or config.optimizer
    if optimizer is None:
        config.optimizer.lr, config.optimizer.lr_warmup_steps = 1e-3, 0
    return ModelPasses(config, groups, None, arch=qwen3_tiny(vocab_size=VOCAB, num_layers=2))


def _shared_per_sample(batch, mbs, per_mb, groups) -> list[list[float]]:
    """Every sample's values from the ranks holding them (the last stage, TP rank 0), on
    every rank."""
    mine = None
    if groups.is_last_stage and groups.tp_rank == 0:
        mine = {}
        for mb, values in zip(mbs, per_mb):
            for i, value in zip(mb.sample_ids.tolist(), values.tolist()):
                mine.setdefault(i, []).append(value)
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    merged = {}
    for part in everyone:
        merged.update(part or {})
    return [merged.get(i, []) for i in range(len(batch.samples))]


def _variant(tp: int, pp: int, variant: str) -> dict:
    """One first PPO update (the policy still holds the sampling weights) in one variant."""
    from sdpg_megatron.experience import micro_batches
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel

    groups = initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=0)
    try:
        batch, advantages = _batch()
        per_rank = len(LENGTHS) // groups.dp_size
        ids = list(range(groups.dp_rank * per_rank, (groups.dp_rank + 1) * per_rank))
        settings = {"recompute": {}, "engine": {"old_logprobs": "engine"}, "tis": {"tis_cap": 1.5}}[variant]
        passes = _passes(groups, **settings)
        mbs = micro_batches(batch, ids, 2, advantages, 0)
        old = passes.old_logprobs(batch, mbs)
        recomputed = _shared_per_sample(batch, mbs, old, groups)
        delta = [[0.1 * (i + 1) * (-1) ** t for t in range(length)] for i, length in enumerate(LENGTHS)]
        if variant == "engine":  # the engine sampled with exactly the trainer's numbers
            engine = recomputed
        elif variant == "tis":  # engine = π_old + δ
            engine = [[o + d for o, d in zip(os_, ds)] for os_, ds in zip(recomputed, delta)]
        else:
            engine = [[0.0] * length for length in LENGTHS]
        for sample, values in zip(batch.samples, engine):
            sample.rollout_logprobs = values
        mbs = micro_batches(batch, ids, 2, advantages, 0)
        report = {"last": groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0, "delta": delta,
                  "mismatch": passes.mismatch_metrics([mbs], [old])}
        result = passes.train(batch, mbs, 1, None, None, first_minibatch=True,
                              old=None if variant == "engine" else old)
        report.update(grad_norm=result.grad_norm,
                      weights=sum(p.detach().double().abs().sum().item() for p in passes.policy.module.parameters()))
        if report["last"]:
            report["losses"] = [float(r["loss"]) for r in result.losses]
            report["tokens"] = [float(r["tokens"]) for r in result.losses]
            report["tis_weight"] = [float(r.get("tis_weight", float("nan"))) for r in result.losses]
            report["first_pass_diff"] = [float(r["rollout_logprob_abs_diff"]) for r in result.losses]
        return report
    finally:
        destroy_parallel()


def _lr_report() -> dict:
    """lr of every update of rollout steps 1–12, for both warm-up units (one rank)."""
    from sdpg_megatron.experience import micro_batches
    from sdpg_megatron.model.training import set_rollout_step
    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel

    groups = initialize_parallel(tensor_parallel=1, pipeline_parallel=1, seed=0)
    try:
        batch, advantages = _batch()
        report = {}
        for unit in ("rollout_step", "optimizer_step"):
            passes = _passes(groups, optimizer=_optimizer(unit))
            lrs = []
            for step in range(1, 13):
                set_rollout_step(passes.policy, step)
                step_lrs = []
                for ids in ([0, 1], [2, 3]):  # two PPO updates per rollout step
                    mbs = micro_batches(batch, ids, 2, advantages, 0)
                    step_lrs.append(passes.train(batch, mbs, step, None, None, first_minibatch=False).lr)
                lrs.append(step_lrs)
            report[unit] = lrs
            fresh = _passes(groups, optimizer=_optimizer(unit)).policy  # what a resumed run starts from
            set_rollout_step(fresh, 7)
            report[f"{unit}/fresh_step7"] = fresh.optimizer.param_groups[0]["lr"]
        return report
    finally:
        destroy_parallel()


def _optimizer(unit: str):
    from sdpg_megatron.config import OptimizerConfig

    return OptimizerConfig(lr=1e-3, lr_warmup_steps=10, lr_warmup_unit=unit)


def _worker(rank: int, world_size: int) -> dict:
    return {f"tp{tp}pp{pp}/{variant}": _variant(tp, pp, variant)
            for tp, pp in ((2, 1), (1, 2), (1, 1)) for variant in ("recompute", "engine", "tis")}


def _lr_worker(rank: int, world_size: int) -> dict:
    return _lr_report()


@pytest.fixture(scope="module")
def reports():
    return run_distributed(_worker, 2, timeout_s=600)


@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2", "tp1pp1"])  # tp1pp1: DP2
def test_recompute_equals_engine_logprobs_that_match_the_trainer(reports, layout):
    """fp32 on CPU: the recompute pass gives the first training forward's log-probs exactly,
    and a step against them equals a step against engine log-probs of the same values."""
    recompute, engine = _last(reports, f"{layout}/recompute"), _last(reports, f"{layout}/engine")
    assert engine["first_pass_diff"] == [0.0] * len(engine["first_pass_diff"])
    assert recompute["losses"] == pytest.approx(engine["losses"], rel=1e-6, abs=1e-9)
    assert engine["mismatch"] == {"mismatch/logprob_abs_diff": 0.0, "mismatch/kl_k3": 0.0}
    for r in reports:
        assert r[f"{layout}/recompute"]["grad_norm"] == pytest.approx(r[f"{layout}/engine"]["grad_norm"], rel=1e-6)
        assert r[f"{layout}/recompute"]["weights"] == pytest.approx(r[f"{layout}/engine"]["weights"], rel=1e-9)
    assert recompute["grad_norm"] > 0
    assert recompute["mismatch"]["mismatch/logprob_abs_diff"] > 1.0  # its engine log-probs were all 0


@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2", "tp1pp1"])
def test_mismatch_metrics_and_tis_under_an_injected_mismatch(reports, layout):
    report = _last(reports, f"{layout}/tis")
    deltas = [d for sample in report["delta"] for d in sample]
    assert report["mismatch"]["mismatch/logprob_abs_diff"] == pytest.approx(sum(map(abs, deltas)) / len(deltas), rel=1e-5)
    k3 = sum(math.exp(-d) - 1 + d for d in deltas) / len(deltas)
    assert report["mismatch"]["mismatch/kl_k3"] == pytest.approx(k3, rel=1e-4)
    # on-policy first update: ℓ_out = −A per token, weighted by min(e^−δ, 1.5); the loss
    # reported per micro-batch is its Σ (Megatron divides by the token count)
    per_rank = len(LENGTHS) // (2 if layout == "tp1pp1" else 1)
    expected = [sum(-ADVANTAGES[i] * min(math.exp(-d), 1.5) for i in (2 * mb, 2 * mb + 1) for d in report["delta"][i])
                for mb in range(per_rank // 2)]
    assert report["losses"] == pytest.approx(expected, rel=1e-5)
    weights = [min(math.exp(-d), 1.5) for i in range(per_rank) for d in report["delta"][i]]
    reported = sum(report["tis_weight"]) / sum(report["tokens"])  # micro-batches report token-weighted sums
    assert reported == pytest.approx(sum(weights) / len(weights), rel=1e-5)
    assert min(weights) < 1.0 < max(weights) <= 1.5  # both sides of 1 and the cap exercised


def test_lr_of_every_update_in_steps_1_to_12():
    (report,) = run_distributed(_lr_worker, 1, timeout_s=600)
    lr = 1e-3
    flat = lambda rows: [x for row in rows for x in row]  # noqa: E731
    expected = [[lr * min(1.0, (k - 1) / 10)] * 2 for k in range(1, 13)]
    assert flat(report["rollout_step"]) == pytest.approx(flat(expected), rel=1e-9, abs=1e-15)
    assert report["rollout_step"][0] == [0.0, 0.0]  # step 1 runs at lr 0, as the authors' scheduler
    assert report["rollout_step/fresh_step7"] == pytest.approx(report["rollout_step"][6][0], rel=1e-12)
    # counted in optimizer steps: update j (1-based, two per rollout step) at lr · min(1, j/10)
    expected_opt = [[lr * min(1.0, (2 * (k - 1) + u) / 10) for u in (1, 2)] for k in range(1, 13)]
    assert flat(report["optimizer_step"]) == pytest.approx(flat(expected_opt), rel=1e-9)
