"""Checkpoints resume training exactly, and a crash never leaves a checkpoint that load picks.

Resume equivalence (spawned gloo ranks): from the tiny HF weights take step A, save, take
step B; then rebuild a policy from a different random init, load, take step B again. Loss,
grad norm and every parameter after B must be identical — which needs the weights, Adam's
moments and step count, and the LR warm-up position all restored. The same workers check
the trainer state and RNG round trip, a refused layout change, and pruning; a world of one
then loads the DP2 checkpoint (the distributed optimizer resharded across DP).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.helpers import VOCAB, tiny_hf_model

GLOBAL_BATCH, SEQ = 2, 8
PROBE = "decoder.layers.3.mlp.linear_fc2.weight"
SCENARIOS = {"tp2": (2, 1, True), "dp2": (1, 1, True), "dp2-plain-adam": (1, 1, False)}  # tp, pp, dist. optimizer
TRAINER_STATE = {"step": 1, "consumed_prompts": 64, "beta": 0.25, "history": [1.5, 2.0], "run": {"name": "tiny"}}


def _build(tp: int, pp: int, distributed_optimizer: bool, *, seed: int, from_hf: bool):
    from sdpg_megatron.config import OptimizerConfig
    from sdpg_megatron.model.hf_mapping import load_hf_weights
    from sdpg_megatron.model.training import build_policy
    from sdpg_megatron.parallel import padded_vocab_size
    from sdpg_megatron.parallel.groups import initialize_parallel

    groups = initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=seed)
    arch, hf_model = tiny_hf_model(tied=True)
    state = hf_model.state_dict()
    load = (lambda m: load_hf_weights(m, arch, state.__getitem__, padded_vocab=padded_vocab_size(VOCAB, tp),
                                      tp_size=tp, tp_rank=groups.tp_rank, pp_size=pp, pp_rank=groups.pp_rank))
    # Warm-up of 3 steps: step B runs at a different LR from step A, so the schedule's
    # position must be restored too.
    settings = OptimizerConfig(lr=1e-3, lr_warmup_steps=3, use_distributed_optimizer=distributed_optimizer)
    return arch, groups, build_policy(arch, groups, settings, load_weights=load if from_hf else None)


def _step(arch, groups, policy, batch_seed: int) -> dict:
    from sdpg_megatron.model.hf_mapping import find_rule, global_name, layer_offset, tp_gather
    from sdpg_megatron.model.training import train_step
    from sdpg_megatron.parallel import vocab_parallel_token_stats

    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(batch_seed))
    per_rank = GLOBAL_BATCH // groups.dp_size
    rows = range(groups.dp_rank * per_rank, (groups.dp_rank + 1) * per_rank)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        hidden = model(batch[:, :-1], torch.arange(SEQ)[None], None, return_hidden=True)

        def loss_func(hidden_states):
            stats = vocab_parallel_token_stats(
                hidden_states.transpose(0, 1).reshape(-1, arch.hidden_size), model.module.output_weight(),
                batch[:, 1:].reshape(-1), group=groups.loss_tp_group, vocab_size=VOCAB)
            loss_sum = -stats.logprobs.sum()
            num_tokens = torch.tensor(stats.logprobs.numel(), dtype=torch.int)
            return loss_sum, num_tokens, {"loss_sum": loss_sum.detach()}

        return hidden, loss_func

    result = train_step(policy, forward_step, iter([tokens[r : r + 1] for r in rows]),
                        num_microbatches=per_rank, seq_length=SEQ, micro_batch_size=1)
    loss = torch.tensor([sum(float(l["loss_sum"]) for l in result.losses)], dtype=torch.float64)
    dist.all_reduce(loss, group=groups.dp_group)
    report = {"loss": loss.item() / (GLOBAL_BATCH * SEQ), "grad_norm": result.grad_norm,
              "params": [p.detach().clone() for p in policy.module.parameters()]}
    offset = layer_offset(arch.num_layers, groups.pp_size, groups.pp_rank)
    for local_name, param in policy.module.named_parameters():
        if global_name(local_name, offset) == PROBE:
            shards = [torch.empty_like(param) for _ in range(groups.tp_size)]
            dist.all_gather(shards, param.detach().contiguous(), group=groups.tp_group)
            report["probe"] = tp_gather(find_rule(arch, PROBE)[1], shards)
    return report


def _draws() -> tuple:
    return torch.rand(4), random.random(), float(np.random.rand())


def _resume_worker(rank: int, world_size: int, root: str) -> dict:
    from pathlib import Path

    from sdpg_megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from sdpg_megatron.parallel.groups import destroy_parallel

    root = Path(root)
    results = {}
    for name, (tp, pp, distributed_optimizer) in SCENARIOS.items():
        arch, groups, policy = _build(tp, pp, distributed_optimizer, seed=0, from_hf=True)
        for seed in (1, 3):  # two steps A: Adam's step count (bias correction) must survive the resume
            _step(arch, groups, policy, batch_seed=seed)
        random.seed(10 + rank)  # per-rank streams, so a rank restoring another's states shows
        np.random.seed(10 + rank)
        torch.manual_seed(10 + rank)
        if rank == 0:  # a save that crashed before its rename
            (root / name / ".tmp-step_00000000" / "rng").mkdir(parents=True)
        saved_to = save_checkpoint(root / name, 1, policy, groups, TRAINER_STATE)
        after_save = _draws()
        original = _step(arch, groups, policy, batch_seed=2)  # step B
        destroy_parallel()

        arch, groups, policy = _build(tp, pp, distributed_optimizer, seed=1234, from_hf=False)
        fresh_params = [p.detach().clone() for p in policy.module.parameters()]
        trainer_state = load_checkpoint(root / name, policy, groups)
        after_load = _draws()
        resumed = _step(arch, groups, policy, batch_seed=2)  # step B again
        results[name] = {
            "saved_to": saved_to.name, "trainer_state": trainer_state,
            "after_save": after_save, "after_load": after_load,
            "original": {k: v for k, v in original.items() if k != "params"},
            "resumed": {k: v for k, v in resumed.items() if k != "params"},
            "max_param_diff": max((a - b).abs().max().item() for a, b in zip(original["params"], resumed["params"])),
            "fresh_differed": any(not torch.equal(a, b) for a, b in zip(fresh_params, original["params"])),
            "leftovers": sorted(p.name for p in (root / name).iterdir()),
        }
        if name == "dp2":
            results["refusals"] = _refusals(root, policy, groups)
            results["pruning"] = _pruning(root / "prune", policy, groups)
            results["empty_root"] = load_checkpoint(root / "never-written", policy, groups)
            results["latest"] = str(latest_checkpoint(root / name).name)
        destroy_parallel()
    return results


def _refusals(root, policy, groups) -> dict:
    """Loads that must fail with a ValueError naming the checkpoint, leaving `policy` as it was."""
    from sdpg_megatron.checkpoint import load_checkpoint

    before = [p.detach().clone() for p in policy.module.parameters()]
    incomplete = root / "dp2" / "step_00000007"  # looks like a checkpoint, no marker
    if dist.get_rank() == 0:
        incomplete.mkdir()
        (incomplete / "trainer_state.json").write_text("{}")
    dist.barrier()
    errors = {}
    for label, path in (("tp2_at_dp2", root / "tp2"), ("incomplete", incomplete)):
        try:
            load_checkpoint(path, policy, groups)
            errors[label] = None
        except ValueError as error:
            errors[label] = str(error)
    errors["untouched"] = all(torch.equal(a, b) for a, b in zip(before, policy.module.parameters()))
    return errors


def _pruning(root, policy, groups) -> dict:
    from sdpg_megatron.checkpoint import latest_checkpoint, save_checkpoint

    listings = []
    for step in (1, 2, 3, 3):  # the last one saves step 3 again, as a resumed run may
        save_checkpoint(root, step, policy, groups, {"step": step}, keep_last=2)
        listings.append(sorted(p.name for p in root.iterdir()))
    return {"listings": listings, "latest": latest_checkpoint(root).name,
            "latest_file": (root / "latest").read_text()}


def _reshard_worker(rank: int, world_size: int, root: str) -> dict:
    """One rank loads the checkpoint two DP ranks wrote and takes step B."""
    from pathlib import Path

    from sdpg_megatron.checkpoint import load_checkpoint
    from sdpg_megatron.parallel.groups import destroy_parallel

    arch, groups, policy = _build(1, 1, True, seed=99, from_hf=False)
    try:
        trainer_state = load_checkpoint(Path(root) / "dp2" / "step_00000001", policy, groups)  # a directory
        report = _step(arch, groups, policy, batch_seed=2)
        return {"trainer_state": trainer_state, **{k: v for k, v in report.items() if k != "params"}}
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    per_rank = run_distributed(_resume_worker, 2, str(root))
    (at_dp1,) = run_distributed(_reshard_worker, 1, str(root))
    return per_rank, at_dp1


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_resume_is_exact(runs, name):
    per_rank, _ = runs
    for results in per_rank:
        result = results[name]
        assert result["saved_to"] == "step_00000001"
        assert result["fresh_differed"]  # the rebuilt policy really started elsewhere
        assert result["resumed"]["grad_norm"] == result["original"]["grad_norm"]
        assert result["resumed"]["loss"] == result["original"]["loss"]
        assert result["max_param_diff"] == 0.0
        torch.testing.assert_close(result["resumed"]["probe"], result["original"]["probe"], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_trainer_state_and_rng_round_trip(runs, name):
    per_rank, _ = runs
    for results in per_rank:
        result = results[name]
        assert result["trainer_state"] == TRAINER_STATE
        torch.testing.assert_close(result["after_load"][0], result["after_save"][0], rtol=0, atol=0)
        assert result["after_load"][1:] == result["after_save"][1:]
    # The ranks' streams differ, so each rank restored its own file.
    assert per_rank[0][name]["after_save"][1] != per_rank[1][name]["after_save"][1]
    assert not torch.equal(per_rank[0][name]["after_save"][0], per_rank[1][name]["after_save"][0])


def test_crash_leftovers_are_removed_by_the_next_save(runs):
    per_rank, _ = runs
    for name in SCENARIOS:
        assert per_rank[0][name]["leftovers"] == ["latest", "step_00000001"]


def test_keep_last_prunes_older_checkpoints(runs):
    pruning = runs[0][0]["pruning"]
    assert pruning["listings"] == [
        ["latest", "step_00000001"],
        ["latest", "step_00000001", "step_00000002"],
        ["latest", "step_00000002", "step_00000003"],
        ["latest", "step_00000002", "step_00000003"],
    ]
    assert pruning["latest"] == pruning["latest_file"] == "step_00000003"


def test_unloadable_checkpoints_are_refused(runs):
    per_rank, _ = runs
    for results in per_rank:
        refusals = results["refusals"]
        assert "TP 2" in refusals["tp2_at_dp2"] and "/tp2/step_00000001" in refusals["tp2_at_dp2"]
        assert "not a complete training checkpoint" in refusals["incomplete"]
        assert "step_00000007" in refusals["incomplete"]
        assert refusals["untouched"]
        assert results["empty_root"] is None
        assert results["latest"] == "step_00000001"  # the marker-less step_00000007 is not chosen


def test_dp2_checkpoint_resumes_at_dp1(runs):
    """dp_reshardable: the distributed optimizer's shards regroup for one DP rank."""
    per_rank, at_dp1 = runs
    original = per_rank[0]["dp2"]["original"]
    assert at_dp1["trainer_state"] == TRAINER_STATE
    assert at_dp1["loss"] == pytest.approx(original["loss"], rel=1e-6)
    assert at_dp1["grad_norm"] == pytest.approx(original["grad_norm"], rel=1e-5)
    # As in test_training_step: DP1 and DP2 sum gradients in different orders.
    torch.testing.assert_close(at_dp1["probe"], original["probe"], rtol=1e-5, atol=5e-5)


# --------------------------------------------------------------------------- filesystem only


def _fake_checkpoint(path, complete: bool = True):
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        (path / "COMPLETE").write_text("{}")
    return path


def test_latest_checkpoint_ignores_incomplete_and_temporary_dirs(tmp_path):
    from sdpg_megatron.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    _fake_checkpoint(tmp_path / "step_00000001")
    two = _fake_checkpoint(tmp_path / "step_00000002")
    _fake_checkpoint(tmp_path / "step_00000003", complete=False)  # crashed mid-save, renamed by hand
    _fake_checkpoint(tmp_path / ".tmp-step_00000004")  # marker written, rename never happened
    _fake_checkpoint(tmp_path / "step_0000005")  # not our name pattern
    assert latest_checkpoint(tmp_path) == two  # no `latest` file: newest complete
    (tmp_path / "latest").write_text("step_00000001\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"  # `latest` wins over newer dirs
    for stale in ("step_00000003", "step_00000009", ".tmp-step_00000004", "../elsewhere", ""):
        (tmp_path / "latest").write_text(stale)
        assert latest_checkpoint(tmp_path) == two, stale


def test_trainer_state_must_be_json(tmp_path):
    from sdpg_megatron.checkpoint import save_checkpoint

    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, 1, None, None, {"bad": object()})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, None, None, {}, keep_last=0)
    assert not any(tmp_path.iterdir())
    assert json.loads(json.dumps(TRAINER_STATE)) == TRAINER_STATE  # the fixture round-trips as JSON
