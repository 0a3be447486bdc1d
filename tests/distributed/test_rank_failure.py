"""Under torchrun, a rank that fails with a user error makes the whole job exit, promptly and non-zero.

Rank 1 fails right after joining the process group (the `SAPLING_FAULT_FAIL_RANK` test hook) while rank 0
goes on into its first collective: rank 1 prints its one-line error, rank 0 one line saying a peer failed
(no backend traceback), and torchrun ends the job with a non-zero status well within a minute.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from sapling.dist import TIMEOUT_ENV, dist_timeout
from sapling.errors import LaunchError
from sapling.faults import FAULT_FAIL_RANK_ENV


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failing_rank_ends_the_job(tmp_path, tokenizer_dir, text_files, demo_cache):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "SAPLING_CACHE": str(demo_cache), FAULT_FAIL_RANK_ENV: "1", TIMEOUT_ENV: "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "sapling", "train", "model.tiny=qwen2-tiny",
           "model.config.vocab_size=384", f"data.tokenizer={tokenizer_dir}", f"data.files=[{text_files[-1]}]",
           "data.seq_len=32", "trainer.max_steps=2", "deepspeed=zero1", "logger=none", "trainer.progress=false",
           f"hydra.run.dir={tmp_path / 'run'}"]
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    assert res.returncode != 0, res.stderr[-3000:]
    # Start-up (imports, DeepSpeed's process group) takes ~20 s here; the failure itself must not add minutes.
    assert wall < 90, f"took {wall:.0f} s\n{res.stderr[-3000:]}"
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("sapling: error:")]
    assert any("rank 1 failed on purpose" in ln for ln in lines), res.stderr[-3000:]
    assert all(ln.count("\n") == 0 for ln in lines)
    assert "[rank0]: Traceback" not in res.stderr and "[rank1]: Traceback" not in res.stderr, res.stderr[-3000:]


def test_dist_timeout_env():
    assert dist_timeout({}).total_seconds() == 600
    assert dist_timeout({TIMEOUT_ENV: "45"}).total_seconds() == 45
    assert dist_timeout({"DEEPSPEED_TIMEOUT": "2"}).total_seconds() == 120
    with pytest.raises(LaunchError, match=TIMEOUT_ENV):
        dist_timeout({TIMEOUT_ENV: "soon"})
