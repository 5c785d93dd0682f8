"""Evaluation bookkeeping and the standalone command's argument errors (the fleet path
itself runs inside tests/test_train.py, on the real AIME 2024 and AMC 2023 files)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdpg_megatron.evaluate import EvalHistory, parse_benchmark_specs


def test_history_tracks_last_and_best(tmp_path):
    history = EvalHistory()
    history.add(10, {"aime24": {"pass@1": 0.2}, "amc23": {"pass@1": 0.5}})
    history.add(20, {"aime24": {"pass@1": 0.3}, "amc23": {"pass@1": 0.4}})
    history.add(30, {"aime24": {"pass@1": 0.3}, "amc23": {"pass@1": 0.45}})
    summary = history.summary()
    assert summary["aime24"]["last"] == 0.3 and summary["aime24"]["best"] == 0.3 and summary["aime24"]["best_step"] == 20
    assert summary["amc23"]["last"] == 0.45 and summary["amc23"]["best"] == 0.5 and summary["amc23"]["best_step"] == 10
    import json

    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    resumed = EvalHistory.load(path, up_to_step=20)  # a run resumed from step 20 drops step 30
    assert resumed.scores == {"aime24": {10: 0.2, 20: 0.3}, "amc23": {10: 0.5, 20: 0.4}}


def test_benchmark_specs_name_the_problem(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"")
    assert parse_benchmark_specs([f"a={tmp_path / 'a.parquet'}"]) == {"a": tmp_path / "a.parquet"}
    with pytest.raises(ValueError, match="name=path"):
        parse_benchmark_specs(["aime24"])
    with pytest.raises(ValueError, match="does not exist"):
        parse_benchmark_specs([f"b={tmp_path / 'missing.parquet'}"])


def test_command_rejects_bad_arguments(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sdpg_megatron.evaluate", "--hf-dir", str(tmp_path), "--benchmark", "aime24",
         "--out", str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "name=path" in result.stderr
