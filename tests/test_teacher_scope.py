"""The teacher pass runs only on the samples the loss needs it for, and the step is the same.

With the positive-advantage gate a sample with A ≤ 0 contributes β·0·KL: its teacher hidden
states are never used. `ModelPasses.teacher_states(..., needed)` packs only the needed
samples into the teacher's micro-batches, and the training pass computes the reverse KL only
for their tokens. This checks, at TP2, PP2 and DP2, that one optimizer step gives the same
loss, gradient norm and weights as the teacher run on every sample; that the teacher ran
on fewer micro-batches; and that opd_kl is then the mean over the gated tokens.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import last_stage_report as _last, run_distributed
from tests.helpers import random_step_batch

VOCAB = 512
# (advantage, response length) per sample, in micro-batches of 2: all needed; mixed, the
# needed sample second; none needed (A = 0 and A < 0); needed with an empty response.
SAMPLES = [(1.0, 5), (0.5, 3), (-1.0, 6), (0.8, 4), (0.0, 2), (-0.3, 4), (0.9, 0), (-0.2, 3)]
MICRO_BATCH = 2


def _batch():
    return random_step_batch(VOCAB, SAMPLES, seed=3)


def _step(tp: int, pp: int, scope: str, mode: str = "stats") -> dict:
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
        config.algorithm.teacher_scope = scope
        config.algorithm.beta_base = 0.5  # a KL term large enough to move the step
        config.algorithm.beta_schedule = "constant"
        config.algorithm.anchor, config.algorithm.alpha = "none", 0.0  # no π_ref: not what is tested
        config.model.loss_backend = "torch"
        config.model.loss_mode = mode
        config.optimizer.lr, config.optimizer.lr_warmup_steps = 1e-3, 0
        passes = ModelPasses(config, groups, None, arch=qwen3_tiny(vocab_size=VOCAB, num_layers=2))
        teacher_batches = []
        forward_only = passes._forward_only

        def counting(model, batch, mbs, view, collect, **options):
            if view == "teacher":
                teacher_batches.append(len(mbs))
            return forward_only(model, batch, mbs, view, collect, **options)

        passes._forward_only = counting
        batch, advantages = _batch()
        per_rank = len(SAMPLES) // groups.dp_size  # at DP2 rank 1's only needed sample has no tokens
        ids = list(range(groups.dp_rank * per_rank, (groups.dp_rank + 1) * per_rank))
        mbs = micro_batches(batch, ids, MICRO_BATCH, advantages, 0)
        needed = teacher_sample_mask(config.algorithm, advantages, 1, 10)
        teacher = passes.teacher_states(batch, mbs, needed)
        result = passes.train(batch, mbs, 1, teacher, None, first_minibatch=True)
        report = {"grad_norm": result.grad_norm, "teacher_batches": teacher_batches,
                  "last": groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0}
        if report["last"]:
            report["weights"] = {name: p.detach().clone() for name, p in passes.policy.module.named_parameters()}
            report["rows"] = ["skipped" if t is None else ("all" if t.rows is None else t.rows.tolist()) for t in teacher]
            report["losses"] = [{k: float(v) for k, v in r.items()} for r in result.losses]
        return report
    finally:
        destroy_parallel()


def _worker(rank: int, world_size: int) -> dict:
    from sdpg_megatron.parallel import single_pass

    torch.manual_seed(0)
    reports = {f"tp{tp}pp{pp}/{scope}": _step(tp, pp, scope)
               for tp, pp in ((2, 1), (1, 2), (1, 1)) for scope in ("all", "needed")}
    # the single pass in chunks of 3 tokens (2 per stage): several chunks and stages per micro-batch
    single_pass._SINGLE_PASS_CHUNK_BYTES = {"cpu": 3 * 2 * 4 * VOCAB}
    reports.update({f"tp{tp}pp{pp}/{scope}/single_pass": _step(tp, pp, scope, "single_pass")
                    for tp, pp in ((2, 1), (1, 2), (1, 1)) for scope in ("all", "needed")})
    return reports


@pytest.fixture(scope="module")
def reports():
    return run_distributed(_worker, 2, timeout_s=600)


def _assert_same_weights(got: dict, expected: dict, *, atol: float) -> None:
    """Every parameter of the reporting rank's model after the step, tensor by tensor, to
    rtol 1e-6 plus `atol`. One Adam step moves a weight by about lr·sign(g) (lr = 1e-3);
    where |g| is near Adam's ε the fp32 rounding of g changes that move, so a weight may
    differ by a small part of one step (measured: ≤ 2.4e-7 with the teacher on fewer
    samples, ≤ 7.6e-5 between the single pass and the two passes)."""
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2", "tp1pp1"])  # tp1pp1: DP2
def test_skipping_gated_samples_keeps_the_step(reports, layout):
    full, needed = _last(reports, f"{layout}/all"), _last(reports, f"{layout}/needed")
    loss = lambda r: sum(x["loss"] for x in r["losses"])  # noqa: E731
    assert loss(needed) == pytest.approx(loss(full), rel=1e-6, abs=1e-9)
    assert needed["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-5)
    _assert_same_weights(needed["weights"], full["weights"], atol=1e-6)
    assert full["grad_norm"] > 0


def test_data_parallel_ranks_may_run_different_teacher_passes(reports):
    """At DP2 rank 0 runs the teacher on 3 samples and rank 1 on none; the step above is
    still the same, and nothing waits on the other rank."""
    assert [r["tp1pp1/needed"]["teacher_batches"] for r in reports] == [[2], []]
    assert [r["tp1pp1/all"]["teacher_batches"] for r in reports] == [[2], [2]]
    assert reports[0]["tp1pp1/needed"]["rows"] == ["all", [6, 7, 8, 9]]


@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2"])
def test_the_teacher_runs_on_the_needed_samples_only(reports, layout):
    full, needed = _last(reports, f"{layout}/all"), _last(reports, f"{layout}/needed")
    assert full["teacher_batches"] == [4]  # every sample, in the student's micro-batches
    assert needed["teacher_batches"] == [2]  # samples 0, 1 and 3 (6 has no tokens)
    assert full["rows"] == ["all"] * 4
    assert needed["rows"] == ["all", [6, 7, 8, 9], "skipped", "skipped"]


@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2"])
def test_opd_kl_is_the_mean_over_the_tokens_the_teacher_ran_for(reports, layout):
    full, needed = _last(reports, f"{layout}/all"), _last(reports, f"{layout}/needed")
    counted = [r.get("opd_kl/tokens") for r in needed["losses"]]
    assert counted == [8.0, 4.0, 0.0, 0.0]  # micro-batch 0: all 8 of its tokens; 2 and 3: none
    assert all(r["opd_kl/tokens"] == r["tokens"] for r in full["losses"])
    # the per-token KL of the needed tokens is the same either way: micro-batch 0 is all needed
    assert needed["losses"][0]["opd_kl"] == pytest.approx(full["losses"][0]["opd_kl"], rel=1e-5)


@pytest.mark.parametrize("scope", ["all", "needed"])
@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2", "tp1pp1"])
def test_single_pass_loss_gives_the_same_step(reports, layout, scope):
    """`model.loss_mode=single_pass` (gradient in the forward, in 3-token chunks; with
    teacher_scope=needed one call with the teacher and one without per micro-batch) against
    the statistics-then-autograd step: loss, every metric, gradient norm and weights."""
    stats, single = _last(reports, f"{layout}/{scope}"), _last(reports, f"{layout}/{scope}/single_pass")
    assert single["grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-5)
    _assert_same_weights(single["weights"], stats["weights"], atol=2e-4)
    for got, expected in zip(single["losses"], stats["losses"], strict=True):
        assert got.keys() == expected.keys()
        for key in expected:
            # fp32 statistics from differently shaped chunks: a KL of ~0.1 is a difference of
            # log-sums of ~6, so agreement is to ~1e-5 absolute
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
