"""The Slurm example across hosts: examples/sdpg_tiny_cpu.sh on the two-node test cluster.

node0 and node1 are network namespaces with their own addresses on a private link
(tests/slurm_cluster.py, `num_nodes=2`); the job body (examples/slurm/sdpg_job.sh) is the
one every GPU script past 4B runs across nodes:

- engine on its own node: the trainer (TP2) on node0, the Ray head and the vLLM engine
  on node1; node0 joins Ray with no resources for the driver; every weight push crosses
  the link (gloo), so do the engine's requests and results (Ray).
- trainer across nodes: DP2 with one rank per node (torchrun on each, the data-parallel
  gradient all-reduce and the checkpoint's collectives over the link), the Ray head and
  the engine on node0 with the driver (TP stays inside a node: the dry run refuses TP
  across nodes).

Each is checked like the one-node run (tests/test_slurm.py): conversion once, training,
metrics once per step, a cancel after the first checkpoint and a resubmission that
resumes across both nodes.
"""

from __future__ import annotations

import time

from tests.slurm_example import script_env, submit_cancel_resume


def test_engine_on_its_own_node_gets_weights_across_hosts(slurm_cluster_2n, tiny_dir, tmp_path):
    cluster, started = slurm_cluster_2n, time.perf_counter()
    env = script_env(cluster, tiny_dir, tmp_path, ROLLOUT_NODES="1")

    runs = submit_cancel_resume(cluster, env, tmp_path, "--nodes=2")

    node0, node1 = cluster.node_addresses
    for log in (runs.first_log, runs.second_log):
        assert "trainer node0 × 2, rollout node1, Ray head " + node1 in log
        assert "weight transport per engine: gloo" in log  # not shared memory: the engine is elsewhere
    assert runs.config["rollout"]["ray_address"].startswith(f"{node1}:")
    print(f"two nodes, engine on node1: submit → cancel → resume → done in {time.perf_counter() - started:.0f} s")


def test_trainer_across_nodes_resumes_on_both(slurm_cluster_2n, tiny_dir, tmp_path):
    cluster, started = slurm_cluster_2n, time.perf_counter()
    env = script_env(cluster, tiny_dir, tmp_path, TRAIN_NODES="2", TRAIN_GPUS_PER_NODE="1", TP="1",
                     MCORE_DIR=str(tmp_path / "model-mcore-tp1"))

    runs = submit_cancel_resume(cluster, env, tmp_path, "--nodes=2")

    node0, _ = cluster.node_addresses
    for log in (runs.first_log, runs.second_log):
        assert "trainer node0 node1 × 1, rollout node0, Ray head " + node0 in log
        assert "weight transport per engine: shm" in log  # the engine shares the driver's node
    assert "TP 1, PP 1" in runs.first_log and runs.config["parallel"]["tensor_parallel"] == 1
    assert runs.config["rollout"]["ray_address"].startswith(f"{node0}:")
    print(f"two nodes, DP2 across them: submit → cancel → resume → done in {time.perf_counter() - started:.0f} s")
