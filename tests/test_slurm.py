"""The Slurm example for real: examples/sdpg_tiny_cpu.sh on a single-node Slurm.

The same path as examples/sdpg_qwen3_4b_tp2.sh — dry run, self-submission through
sbatch, conversion with tools/hf_to_mcore.py, a Ray cluster started by the job, srun +
torchrun (TP2 on gloo), checkpoints — then a cancel mid-run and a resubmission that
resumes from the last checkpoint and finishes the run.
"""

from __future__ import annotations

import subprocess
import time

from tests.slurm_example import SCRIPT, script_env, submit_cancel_resume


def test_tiny_example_dry_run_prints_the_layout(slurm_cluster, tiny_dir, tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=script_env(slurm_cluster, tiny_dir, tmp_path),
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TP 2 × PP 1 × DP 1" in result.stdout and "dry run: OK" in result.stdout
    assert "does not exist yet: the job converts" in result.stdout  # the Megatron checkpoint comes later


def test_tiny_example_trains_checkpoints_and_resumes_after_cancel(slurm_cluster, tiny_dir, tmp_path):
    started = time.perf_counter()
    runs = submit_cancel_resume(slurm_cluster, script_env(slurm_cluster, tiny_dir, tmp_path), tmp_path)
    assert runs.config["parallel"]["tensor_parallel"] == 2
    assert runs.config["rollout"]["ray_address"].startswith("127.0.0.1:")
    print(f"slurm example: submit → cancel → resume → done in {time.perf_counter() - started:.0f} s")
