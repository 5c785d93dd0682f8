"""Benchmarks are not tests; CI only checks that they run (small shapes) and report."""

import json
import subprocess
import sys
from pathlib import Path

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
