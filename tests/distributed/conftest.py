"""Launching a worker script on 2 CPU ranks (torchrun, gloo, DeepSpeed's CPU accelerator)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HERE = Path(__file__).parent
# Workers that take no input but their result path and check their own single-process reference: one torchrun
# launch runs them all (run_workers.py), once per session, so 2 ranks start and import DeepSpeed once, not per test.
SHARED_WORKERS = ("features_zero3_worker.py", "kd_head_zero3_worker.py", "prune_distributed_worker.py")


def _launch(worker: Path, *args: str) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), str(worker), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


@pytest.fixture(scope="session")
def two_rank_workers(tmp_path_factory) -> dict[str, dict]:
    """{worker file name: its parsed result} for SHARED_WORKERS, run in one 2-rank launch."""
    out = tmp_path_factory.mktemp("two_rank_workers")
    _launch(HERE / "run_workers.py", str(out), *(str(HERE / w) for w in SHARED_WORKERS))
    return {w: json.loads((out / f"{Path(w).stem}.json").read_text()) for w in SHARED_WORKERS}


@pytest.fixture
def run_two_ranks(tmp_path):
    """`run(worker, *args)`: run `worker <result.json> *args` on 2 ranks, assert it succeeded, return the
    parsed result."""

    def run(worker: Path, *args: str) -> dict:
        out = tmp_path / "result.json"
        _launch(worker, str(out), *args)
        return json.loads(out.read_text())

    return run
