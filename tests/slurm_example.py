"""The tiny Slurm example (examples/sdpg_tiny_cpu.sh) run for real, shared by the tests that
run it on the one-node and the two-node test clusters (tests/slurm_cluster.py).

`submit_cancel_resume` is the whole check: the script submits itself, the job converts
the model once and trains; it is cancelled once its first checkpoint is complete, and the
resubmitted job resumes from that checkpoint and finishes, every step's metrics exactly
once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "sdpg_tiny_cpu.sh"
STEPS = 3
_ENDED = ("FAILED", "COMPLETED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def make_tiny_dir(out: Path) -> Path:
    """The tiny model and data, made once (the script would make them on first start)."""
    subprocess.run([sys.executable, "-m", "sdpg_megatron.tiny", "--out", str(out), "--sft-steps", "20"],
                   check=True, capture_output=True, timeout=600)
    return out


def script_env(cluster, tiny_dir: Path, tmp_path: Path, **extra: str) -> dict:
    return {
        **cluster.env, "SDPG_ROOT": str(ROOT), "PYTHON": sys.executable, "TINY_DIR": str(tiny_dir),
        "MCORE_DIR": str(tmp_path / "model-mcore-tp2"), "OUT_DIR": str(tmp_path / "run"), "STEPS": str(STEPS),
        "CHECKPOINT_INTERVAL": "1", **extra,
    }


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def job_log(tmp_path: Path, job_id: int) -> str:
    return (tmp_path / f"sdpg-tiny-cpu-{job_id}.out").read_text(errors="replace")


@dataclass
class Runs:
    first_log: str
    second_log: str
    config: dict


def submit_cancel_resume(cluster, env: dict, tmp_path: Path, *sbatch_args: str) -> Runs:
    """Submit → first checkpoint → cancel → resubmit (sbatch_args, e.g. --nodes=2) → done; asserts
    conversion once, a resume from the newest complete checkpoint and each step's metrics once."""
    run_dir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"

    # 1. `bash examples/sdpg_tiny_cpu.sh` checks, then submits itself (from the cluster's first node)
    submitted = subprocess.run([*cluster.exec_prefix(), "bash", str(SCRIPT)], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=600)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-3000:]
    first = int(re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1))

    # 2. cancel it once its first checkpoint is complete (a preemption loses what follows)
    cluster.wait_for(
        lambda: (checkpoints / "step_00000001" / "COMPLETE").exists() or cluster.job_state(first) in _ENDED,
        timeout_s=600, interval_s=2, what="the first checkpoint",
    )
    assert (checkpoints / "step_00000001" / "COMPLETE").exists(), job_log(tmp_path, first)[-6000:]
    cluster.scancel(first)
    assert cluster.wait_for_state(first, "CANCELLED", timeout_s=60) == "CANCELLED"
    first_log = job_log(tmp_path, first)
    assert "converting" in first_log and Path(env["MCORE_DIR"], "metadata.json").is_file()
    done_before = metrics_steps(run_dir)
    assert 1 <= len(done_before) < STEPS, first_log[-4000:]
    saved = max(int(path.name[5:]) for path in checkpoints.glob("step_*") if (path / "COMPLETE").exists())

    # 3. resubmitted, it resumes from the newest complete checkpoint and finishes
    try:
        second = cluster.sbatch(SCRIPT, *sbatch_args, wait=True, env=env, cwd=tmp_path, timeout_s=900)
    except Exception as error:
        logs = sorted(tmp_path.glob("sdpg-tiny-cpu-*.out"))
        raise AssertionError(f"{error}\n{logs[-1].read_text(errors='replace')[-6000:] if logs else ''}") from error
    second_log = job_log(tmp_path, second)
    assert "converting" not in second_log  # converted once
    resumed = int(re.search(r"resuming after step (\d+)", second_log).group(1))
    assert resumed == saved  # the newest complete checkpoint when the job was cancelled
    assert metrics_steps(run_dir) == list(range(1, STEPS + 1))  # every step once: the redone ones replaced
    assert (checkpoints / f"step_{STEPS:08d}" / "COMPLETE").exists()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["mcore_dir"] == env["MCORE_DIR"]
    return Runs(first_log, second_log, config)
