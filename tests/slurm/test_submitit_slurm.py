"""A Hydra sweep through `hydra/launcher=submitit_slurm` on the one-machine Slurm cluster.

One job of 2 tasks (one rank each, the process group built from Slurm's variables, no torchrun) is
sent USR2, submitit's pre-timeout signal: the trainer checkpoints at a step boundary, hands the signal
back to submitit, which requeues the job; the requeued job resumes and finishes all steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

STEPS = 40


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_submitit_slurm_job_of_two_tasks_requeues_on_usr2(slurm, tmp_path, teacher_dir, corpus_file, demo_cache):
    env = {**slurm.env, "SAPLING_CACHE": str(demo_cache), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sapling", "distill", "-m", "distill.temperature=2", "hydra/launcher=submitit_slurm",
         "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=30", "deepspeed=zero2", f"teacher.path={teacher_dir}",
         "student.config.num_hidden_layers=1", f"data.files=[{corpus_file}]", "data.seq_len=32",
         f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.micro_batch_size=2", "trainer.eval_batches=2",
         "trainer.eval_every=0", "logger=none", "trainer.progress=false", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, stdout=(tmp_path / "launcher.log").open("w"), stderr=subprocess.STDOUT)
    try:
        metrics = sweep / "0" / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while sum(r["event"] == "train" for r in _records(metrics)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()[-3000:]
            time.sleep(0.2)
        job_id = slurm.run("squeue", "-h", "-o", "%i").stdout.split()[0]
        slurm.run("scancel", "--signal=USR2", job_id)
        assert proc.wait(timeout=600) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    info = slurm.wait_state(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 120)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    recs = _records(metrics)
    stopped = [r for r in recs if r["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGUSR2" and stopped[0]["step"] < STEPS
    resumed = [r for r in recs if r["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] == stopped[0]["step"] and resumed[0]["world_size"] == 2
    assert [r["step"] for r in recs if r["event"] == "train"] == list(range(1, STEPS + 1))
    assert [r["step"] for r in recs if r["event"] == "done"] == [STEPS]
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert "rank 0/2" in logs and "rank 1/2" in logs  # one world of the two Slurm tasks
