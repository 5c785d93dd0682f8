"""Benchmarks are not tests; CI only checks that they run (small shapes) and report."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_quick(script: str, out: Path, timeout_s: int) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=timeout_s,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_vocab_parallel_loss_benchmark_runs(tmp_path):
    out = tmp_path / "bench.json"
    result = run_quick("bench_vocab_parallel_loss.py", out, 300)
    assert "targets met:" in result.stdout
    record = json.loads(out.read_text())
    assert record["collectives_tp2"]["fused"]["forward_calls"] == 2
    assert record["results"]["fused"]["flops"] > 0


def test_conversion_benchmark_runs(tmp_path):
    out = tmp_path / "conversion.json"
    run_quick("bench_conversion.py", out, 600)
    record = json.loads(out.read_text())
    assert set(record["rows"]) == {"hf_to_mcore (streaming)", "plain (model in memory + save)", "mcore_to_hf (streaming)"}
    assert all(row["seconds"] > 0 for row in record["rows"].values())


def test_rollout_benchmark_runs(tmp_path):
    out = tmp_path / "rollout.json"
    run_quick("bench_rollout.py", out, 900)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["push_s"] > 0 and row["fleet_tokens_per_s"] > 0 and row["bare_tokens_per_s"] > 0


def test_teacher_scope_benchmark_runs(tmp_path):
    out = tmp_path / "teacher_scope.json"
    result = run_quick("bench_teacher_scope.py", out, 300)
    assert "needed / all:" in result.stdout
    record = json.loads(out.read_text())
    assert record["batch"]["samples_with_positive_advantage"] == 6
    assert record["scopes"]["all"]["teacher_samples"] == 16 and record["scopes"]["needed"]["teacher_samples"] == 6
    first = record["first_step"]
    assert first["needed"]["loss"] == pytest.approx(first["all"]["loss"], rel=1e-6)


def test_dynamic_batching_benchmark_runs(tmp_path):
    out = tmp_path / "dynamic_batching.json"
    result = run_quick("bench_dynamic_batching.py", out, 300)
    assert "dynamic / padded time:" in result.stdout
    record = json.loads(out.read_text())
    assert record["modes"]["dynamic"]["padded_over_real"] < record["modes"]["padded"]["padded_over_real"]
    first = record["first_step"]
    assert first["dynamic"]["loss"] == pytest.approx(first["padded"]["loss"], rel=1e-5)


def test_gpu_benchmarks_smoke_run_and_summarize(tmp_path):
    """`benchmarks/gpu/`'s scripts at CPU smoke sizes (their numbers mean nothing here),
    then summarize.py over them and over the committed H100 anatomy figures."""
    gpu = ROOT / "benchmarks" / "gpu"
    for args in (
        ["bench_fused_loss.py", "--tokens", "64", "--hidden", "32", "--vocab", "512", "--repeats", "1",
         "--methods", "torch", "naive", "single_pass", "single_pass_fp32@16", "--out", str(tmp_path / "fused_tp1.json")],
        ["bench_train_step.py", "--arch", "qwen3-tiny", "--steps", "2", "--prompts", "2", "--group-size", "2",
         "--prompt-tokens", "16", "--hint-tokens", "8", "--response-tokens", "16",
         "--out", str(tmp_path / "train_step.json")],
    ):
        result = subprocess.run([sys.executable, str(gpu / args[0]), *args[1:]], capture_output=True, text=True,
                                timeout=300, env={**os.environ, "MASTER_PORT": "29631"})
        assert result.returncode == 0, result.stderr[-3000:]
    shutil.copy(ROOT / "benchmarks/results/gpu_h100_2026-11-27_tma/experimental_run5/anatomy.json", tmp_path)

    result = subprocess.run([sys.executable, str(gpu / "summarize.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.strip() == result.stdout.strip()  # printed and written alike
    fused = json.loads((tmp_path / "fused_tp1.json").read_text())
    assert fused["methods"]["torch"]["ms"] > 0 and "| torch |" in summary and "| naive |" in summary
    assert fused["methods"]["single_pass_fp32@16"]["ms"] > 0 and "| single_pass_fp32@16 |" in summary
    # fp32 logits on CPU: the bf16 gradients carry one rounding (~2e-3), naive bf16 logits ~10x that
    assert fused["precision_4096_tokens"]["single_pass"]["grad_weight"] < 5e-3
    step = json.loads((tmp_path / "train_step.json").read_text())
    assert not [name for name, loss in step["losses"].items() if "error" in loss], step["losses"]
    assert [len(step["losses"][name]["steps_s"]) for name in ("kernel", "single_pass", "naive")] == [2, 2, 2]
    assert "(2) |" in summary  # the steps' spread is shown next to their median
    anatomy = json.loads((tmp_path / "anatomy.json").read_text())
    rows = [line for line in summary.splitlines() if line.startswith("| M")]
    assert len(rows) == len(anatomy["configs"]) and sum(line.endswith("| yes |") for line in rows) == 1


def test_step_vs_trl_benchmark_reads_the_demo_workload_and_counts_rounds():
    """What runs without TRL (not a dependency): the step's shape comes from the demo's
    settings, and a round closes after its two optimizer updates, its phases split."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_step_vs_trl as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    shape = bench.workload(40)
    assert (shape["responses_per_step"], shape["responses_per_update"], shape["max_response_tokens"]) == (128, 64, 64)
    clock = bench.RoundClock(updates_per_round=2)
    clock.start()
    with clock.phase("rollout"):
        with clock.phase("generate"):
            pass
    clock.update_done()
    assert clock.rounds == []
    clock.update_done()
    (row,) = clock.rounds
    assert row["round"] == 1 and row["step_s"] >= row["generate_s"] >= 0 and row["train_s"] >= 0
