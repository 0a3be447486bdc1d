"""A real Slurm cluster on this machine for the module's tests (see local_cluster.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from local_cluster import LocalSlurm, is_running  # noqa: E402


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """munged + slurmctld + slurmd on localhost; every daemon it started is gone after the session."""
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        started = cluster.daemon_pids()
        cluster.stop()
        alive = [pid for pid in started if is_running(pid)]
        assert not alive, f"Slurm daemons still running after stop(): {alive}"

