import os
import warnings

# Megatron-Core warns at import that TE/apex are absent; that is the CPU path by design.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message="Apex is not installed.*")
os.environ.setdefault("OMP_NUM_THREADS", "1")


import pytest  # noqa: E402

# Shared helpers hold asserts too: rewrite them like a test file's (must precede their import).
pytest.register_assert_rewrite("tests.helpers")


@pytest.fixture(scope="session")
def slurm_cluster():
    """One single-node Slurm (munge, slurmctld, slurmd on loopback) for the whole session;
    stopped by pid at the end (tests/slurm_cluster.py)."""
    from tests.slurm_cluster import temporary_slurm_cluster

    with temporary_slurm_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm_cluster_2n():
    """One two-node Slurm (node0 and node1, each in a network namespace of its own with its own
    address on a private link) for the whole session; stopped, namespaces removed, at the end."""
    from tests.slurm_cluster import temporary_slurm_cluster

    with temporary_slurm_cluster(num_nodes=2) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny model and data of examples/sdpg_tiny_cpu.sh, made once for the Slurm example
    tests on one node and on two (the script would make them on first start)."""
    from tests.slurm_example import make_tiny_dir

    return make_tiny_dir(tmp_path_factory.mktemp("tiny"))
