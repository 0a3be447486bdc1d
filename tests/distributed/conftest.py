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


@pytest.fixture
def run_two_ranks(tmp_path):
    """`run(worker, *args)`: run `worker <result.json> *args` on 2 ranks, assert it succeeded, return the
    parsed result."""

    def run(worker: Path, *args: str) -> dict:
        out = tmp_path / "result.json"
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), str(worker), str(out), *args]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
        return json.loads(out.read_text())

    return run
