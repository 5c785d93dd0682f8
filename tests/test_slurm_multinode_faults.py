"""Faults across hosts, on the two-node test cluster (tests/slurm_cluster.py, `num_nodes=2`),
through the job body every multi-node script runs (examples/slurm/sdpg_job.sh):

- the engine's node loses its Ray node mid-run (its raylet is killed): the job stops
  within a bounded time with a message that names the node;
- a job whose second node never comes up (its slurmd is gone) fails at start-up with the
  node's name instead of hanging.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.slurm_cluster import FINISHED_STATES, temporary_slurm_cluster
from tests.slurm_example import SCRIPT, job_log, script_env


def _named_pids(cluster, node: int, name: str) -> set[int]:
    found = set()
    for pid in cluster.network.pids(node):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                found.add(pid)
        except OSError:
            pass
    return found


def test_engine_node_losing_its_ray_node_stops_the_run_naming_it(slurm_cluster_2n, tiny_dir, tmp_path):
    cluster = slurm_cluster_2n
    env = script_env(cluster, tiny_dir, tmp_path, ROLLOUT_NODES="1", STEPS="40")  # engine (and Ray head) on node1
    job_id = cluster.sbatch(SCRIPT, "--nodes=2", "--no-requeue", env=env, cwd=tmp_path)
    cluster.wait_for(
        lambda: "engine(s) ready" in _log(tmp_path, job_id) or cluster.job_state(job_id) in FINISHED_STATES,
        timeout_s=600, interval_s=2, what="the rollout engine on node1",
    )
    assert cluster.job_state(job_id) == "RUNNING", _log(tmp_path, job_id)[-6000:]
    raylets = _named_pids(cluster, 1, "raylet")
    assert len(raylets) == 1, raylets

    killed = time.monotonic()
    os.kill(raylets.pop(), signal.SIGKILL)

    state = cluster.wait_for_state(job_id, FINISHED_STATES, timeout_s=120)
    took, log = time.monotonic() - killed, _log(tmp_path, job_id)
    assert state == "FAILED", log[-6000:]
    assert "sdpg_job: run stopped: node node1 lost its Ray node" in log, log[-6000:]
    assert took < 120
    print(f"engine node lost its raylet: job stopped after {took:.0f} s")


def test_job_whose_second_node_never_comes_up_fails_naming_it(tiny_dir, tmp_path):
    with temporary_slurm_cluster(num_nodes=2) as cluster:  # its own: node1's slurmd is stopped for good
        env = script_env(cluster, tiny_dir, tmp_path, ROLLOUT_NODES="1")
        cluster.stop_daemon("slurmd-node1")  # slurmctld still counts node1 as idle for SlurmdTimeout

        started = time.monotonic()
        job_id = cluster.sbatch(SCRIPT, "--nodes=2", "--no-requeue", env=env, cwd=tmp_path)
        state = cluster.wait_for_state(job_id, FINISHED_STATES, timeout_s=180)

        log = _log(tmp_path, job_id)
        assert state in ("FAILED", "NODE_FAIL"), log[-4000:]
        assert "sdpg_job: could not run a step on node1" in log, log[-4000:]
        took = time.monotonic() - started
        assert took < 120
        print(f"second node down: job failed after {took:.0f} s")


def _log(tmp_path: Path, job_id: int) -> str:
    try:
        return job_log(tmp_path, job_id)
    except FileNotFoundError:
        return ""
