"""The test Slurm cluster (tests/slurm_cluster.py): jobs, steps, cancel, requeue, clean stop.

Needs the Slurm and MUNGE binaries (tools/install_slurm.sh) and root; a missing binary
fails loudly rather than skipping, so a broken install does not pass unnoticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests import slurm_cluster as slurm_cluster_module
from tests.slurm_cluster import FINISHED_STATES, SlurmCluster, SlurmCommandError, temporary_slurm_cluster


def _pids_with_slurm_conf(conf_path: Path) -> set[int]:
    """Live processes whose environment points at this cluster's slurm.conf."""
    marker = f"SLURM_CONF={conf_path}".encode()
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.add(int(proc.name))
            except OSError:
                pass
    return pids


def test_batch_job_runs_srun_step(slurm_cluster, tmp_path):
    out_file = tmp_path / "job.txt"
    script = '#!/bin/bash\n{ hostname -s; echo "$SLURM_JOB_ID"; echo "$SLURM_NTASKS"; srun --ntasks=1 echo hi; } > "$OUT_FILE"\n'

    job_id = slurm_cluster.sbatch(script, "--ntasks=1", wait=True, env={"OUT_FILE": str(out_file)})

    assert out_file.read_text().split() == [slurm_cluster.node_name, str(job_id), "1", "hi"]
    assert slurm_cluster.job_state(job_id) == "COMPLETED"


def test_sbatch_wait_raises_when_the_job_fails(slurm_cluster):
    with pytest.raises(SlurmCommandError, match="job [0-9]+ exited 3 \\(FAILED\\)"):
        slurm_cluster.sbatch("#!/bin/bash\nexit 3\n", wait=True)


def test_scancel_ends_running_job_promptly(slurm_cluster):
    job_id = slurm_cluster.sbatch("#!/bin/bash\nsleep 300\n")
    slurm_cluster.wait_for_state(job_id, "RUNNING", timeout_s=15)

    started = time.monotonic()
    slurm_cluster.scancel(job_id)

    assert slurm_cluster.wait_for_state(job_id, FINISHED_STATES, timeout_s=10) == "CANCELLED"
    assert time.monotonic() - started < 10
    slurm_cluster.wait_for(lambda: slurm_cluster.node_state() == "idle", timeout_s=10, what="node idle again")


def test_requeued_job_runs_again(slurm_cluster, tmp_path):
    runs_file = tmp_path / "runs.txt"
    script = '#!/bin/bash\necho "run ${SLURM_RESTART_COUNT:-0}" >> "$RUNS_FILE"\nsleep 300\n'
    job_id = slurm_cluster.sbatch(script, "--requeue", env={"RUNS_FILE": str(runs_file)})
    slurm_cluster.wait_for(runs_file.exists, timeout_s=15, what="first run")

    slurm_cluster.run("scontrol", "requeue", str(job_id))

    # A requeued job is held for cred_expire + 1 s (11 s here) before it may start again.
    slurm_cluster.wait_for(lambda: "run 1" in runs_file.read_text(), timeout_s=30, what="second run")
    assert runs_file.read_text().splitlines() == ["run 0", "run 1"]
    slurm_cluster.scancel(job_id)
    assert slurm_cluster.wait_for_state(job_id, FINISHED_STATES, timeout_s=10) == "CANCELLED"


def test_stop_cancels_jobs_and_leaves_no_processes(slurm_cluster):
    # A second cluster beside the module's one: its own ports, socket and key keep them apart.
    with temporary_slurm_cluster() as cluster:
        pids = cluster.daemon_pids
        assert sorted(pids) == ["munged", "slurmctld", "slurmd"]
        assert set(pids.values()) <= _pids_with_slurm_conf(cluster.conf_path)
        job_id = cluster.sbatch("#!/bin/bash\nsleep 300\n")
        cluster.wait_for_state(job_id, "RUNNING", timeout_s=15)

        cluster.stop()

        for name, pid in pids.items():
            assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) still running after stop()"
        assert _pids_with_slurm_conf(cluster.conf_path) == set()
        assert cluster.daemon_pids == {}
        cluster.stop()  # idempotent
    assert slurm_cluster.node_state() == "idle"  # the other cluster was left alone


def test_two_nodes_each_see_their_own_address_and_reach_each_other(slurm_cluster_2n):
    cluster = slurm_cluster_2n
    step = "echo $SLURMD_NODENAME $(hostname) $(hostname --ip-address) $(ip -o -4 addr show scope global | wc -l)"
    result = cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "--label", "bash", "-c", step)
    lines = sorted(result.stdout.split("\n")[:-1])
    assert lines == [f"0: node0 node0 {cluster.node_addresses[0]} 1", f"1: node1 node1 {cluster.node_addresses[1]} 1"]
    reach = ("import socket; s = socket.create_connection(('node0', %d), timeout=5); print(s.getsockname()[0])"
             % cluster.slurmctld_port)  # slurmctld listens on node0
    result = cluster.run("srun", "--nodes=1", "-w", "node1", "python3", "-c", reach)
    assert result.stdout.split() == [cluster.node_addresses[1]]


def test_two_node_cluster_stops_by_pid_and_removes_its_network():
    with temporary_slurm_cluster(num_nodes=2) as cluster:
        pids, namespaces = cluster.daemon_pids, list(cluster.network.namespaces)
        assert sorted(pids) == ["munged", "slurmctld", "slurmd", "slurmd-node1"]
        job_id = cluster.sbatch("#!/bin/bash\nsrun --nodes=2 sleep 300\n", "--nodes=2")
        cluster.wait_for_state(job_id, "RUNNING", timeout_s=15)
        cluster.wait_for(lambda: len(cluster.network.pids()) > 4, timeout_s=15, what="the steps on both nodes")

        cluster.stop()

        for name, pid in pids.items():
            assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) still running after stop()"
        assert _pids_with_slurm_conf(cluster.conf_path) == set()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert not any(namespace in listed for namespace in namespaces)
        assert cluster.network.hosts_dir is None


def test_two_node_cluster_that_fails_to_start_removes_its_network(monkeypatch):
    monkeypatch.setattr(SlurmCluster, "_slurm_conf", lambda self: "NotASlurmOption=1\n")
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"), num_nodes=2, start_timeout_s=5)
    try:
        with pytest.raises(RuntimeError, match="did not start"):
            cluster.start()
    finally:
        shutil.rmtree(cluster.root_dir, ignore_errors=True)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(namespace in listed for namespace in cluster.network.namespaces)
    assert cluster.daemon_pids == {}


def test_missing_binaries_name_the_install_script(monkeypatch, tmp_path):
    monkeypatch.setattr(slurm_cluster_module, "_SEARCH_PATH", str(tmp_path))

    with pytest.raises(FileNotFoundError, match="tools/install_slurm.sh"):
        SlurmCluster("/tmp/slurm-unused").start()


def test_long_root_dir_is_rejected():
    with pytest.raises(ValueError, match="root_dir"):
        SlurmCluster("/tmp/" + "x" * 100)
