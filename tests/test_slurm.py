"""The Slurm example for real: examples/sdpg_tiny_cpu.sh on a single-node Slurm.

The same path as examples/sdpg_qwen3_4b_tp2.sh — dry run, self-submission through
sbatch, conversion with tools/hf_to_mcore.py, a Ray cluster started by the job, srun +
torchrun (TP2 on gloo), checkpoints — then a cancel mid-run and a resubmission that
resumes from the last checkpoint and finishes the run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "sdpg_tiny_cpu.sh"
STEPS = 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny model and data, made once (the script would make them on first start)."""
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, "-m", "sdpg_megatron.tiny", "--out", str(out), "--sft-steps", "20"],
                   check=True, capture_output=True, timeout=600)
    return out


def _script_env(cluster, tiny_dir: Path, tmp_path: Path) -> dict:
    return {
        **cluster.env, "SDPG_ROOT": str(ROOT), "PYTHON": sys.executable, "TINY_DIR": str(tiny_dir),
        "MCORE_DIR": str(tmp_path / "model-mcore-tp2"), "OUT_DIR": str(tmp_path / "run"), "STEPS": str(STEPS),
        "CHECKPOINT_INTERVAL": "1",
    }


def _metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_tiny_example_dry_run_prints_the_layout(slurm_cluster, tiny_dir, tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=_script_env(slurm_cluster, tiny_dir, tmp_path),
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TP 2 × PP 1 × DP 1" in result.stdout and "dry run: OK" in result.stdout
    assert "does not exist yet: the job converts" in result.stdout  # the Megatron checkpoint comes later


def test_tiny_example_trains_checkpoints_and_resumes_after_cancel(slurm_cluster, tiny_dir, tmp_path):
    env = _script_env(slurm_cluster, tiny_dir, tmp_path)
    run_dir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    started = time.perf_counter()

    # 1. `bash examples/sdpg_tiny_cpu.sh` checks, then submits itself
    submitted = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-3000:]
    first = int(re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1))
    log = lambda job: (tmp_path / f"sdpg-tiny-cpu-{job}.out").read_text(errors="replace")  # noqa: E731

    # 2. cancel it once its first checkpoint is complete (a preemption loses what follows)
    slurm_cluster.wait_for(
        lambda: (checkpoints / "step_00000001" / "COMPLETE").exists() or slurm_cluster.job_state(first) in
        ("FAILED", "COMPLETED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
        timeout_s=420, interval_s=2, what="the first checkpoint",
    )
    assert (checkpoints / "step_00000001" / "COMPLETE").exists(), log(first)[-4000:]
    slurm_cluster.scancel(first)
    assert slurm_cluster.wait_for_state(first, "CANCELLED", timeout_s=60) == "CANCELLED"
    assert "converting" in log(first) and (tmp_path / "model-mcore-tp2" / "metadata.json").is_file()
    done_before = _metrics_steps(run_dir)
    assert 1 <= len(done_before) < STEPS, log(first)[-4000:]
    saved = max(int(path.name[5:]) for path in checkpoints.glob("step_*") if (path / "COMPLETE").exists())

    # 3. resubmitted, it resumes from the newest complete checkpoint and finishes
    second = slurm_cluster.sbatch(SCRIPT, wait=True, env=env, cwd=tmp_path, timeout_s=900)
    second_log = log(second)
    assert "converting" not in second_log  # converted once
    resumed = int(re.search(r"resuming after step (\d+)", second_log).group(1))
    assert resumed == saved  # the newest complete checkpoint when the job was cancelled
    assert _metrics_steps(run_dir) == list(range(1, STEPS + 1))  # every step once: the redone ones replaced
    assert (checkpoints / f"step_{STEPS:08d}" / "COMPLETE").exists()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["parallel"]["tensor_parallel"] == 2 and config["model"]["mcore_dir"].endswith("model-mcore-tp2")
    assert config["rollout"]["ray_address"].startswith("127.0.0.1:")
    print(f"slurm example: submit → cancel → resume → done in {time.perf_counter() - started:.0f} s")
