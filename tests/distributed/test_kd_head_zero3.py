"""The fused KD head under DeepSpeed ZeRO-3 on 2 CPU ranks equals a single-process reference."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("kd_head_zero3_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kd_head_zero3_two_ranks_matches_single_process(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(WORKER), str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    assert result["head_partitioned"], "lm_head weight should be partitioned by ZeRO-3 outside its forward"
    assert abs(result["loss"] - result["ref_loss"]) <= 1e-5 * abs(result["ref_loss"])
    assert result["num_params"] > 5
    worst = max(result["grad_rel_err"].items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-5, worst
