"""The `slurm_cluster` fixture: a one-node Slurm cluster on 127.0.0.1 (tests/launch/slurm_cluster.py)."""

import pytest

from tests.launch.slurm_cluster import ClusterUnavailable, SlurmCluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running SlurmCluster (`.env` for sbatch/srun/squeue/scontrol, `.conf`, `.host`, `.run`);
    the tests using it skip when Slurm and munge are not installed or the cluster does not start."""
    try:
        cluster = SlurmCluster.start()
    except ClusterUnavailable as e:
        pytest.skip(f"no Slurm test cluster: {e}")
    yield cluster
    cluster.stop()
