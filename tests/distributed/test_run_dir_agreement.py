"""Ranks that resolve different Hydra run dirs (a `${now:...}` a second apart) still share rank 0's.

Each rank here gets its own `hydra.run.dir` on purpose (`.../rank${oc.env:RANK}`): every checkpoint
shard, the metrics and the model must land in rank 0's directory, none in rank 1's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def test_all_ranks_write_into_rank0_output_dir(tmp_path, teacher_dir, corpus_file, demo_cache):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "SAPLING_CACHE": str(demo_cache),
           "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), "-m", "sapling", "distill", f"teacher.path={teacher_dir}",
         "student.config.num_hidden_layers=1", f"data.files=[{corpus_file}]", "data.seq_len=32",
         "trainer.max_steps=2", "trainer.save_every=2", "trainer.micro_batch_size=2", "trainer.eval_batches=1",
         "deepspeed=zero2", "logger=none", "trainer.progress=false", f"hydra.run.dir={tmp_path}/rank" + "${oc.env:RANK}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    shards = sorted(p.name for p in (rank0 / "checkpoints").rglob("*optim_states.pt"))
    assert len(shards) == 2 and any("rank_1" in s for s in shards), shards
    assert (rank0 / "metrics.jsonl").exists() and (rank0 / "model" / "config.json").exists()
    assert not (rank1 / "checkpoints").exists() and not (rank1 / "metrics.jsonl").exists()
