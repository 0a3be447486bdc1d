"""`launchers/slurm.sbatch` on a real (one-machine) Slurm cluster: 2 ranks on CPU (gloo, DeepSpeed ZeRO-2).

Two identical tiny distillations are submitted together. One runs to the end; the other is sent
`scancel --signal=USR1` mid-training, which must checkpoint, requeue the job (same id, same run dir)
and resume to the same final step, reproducing the uninterrupted run's final validation loss.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
STEPS = 40
SIGNAL_AFTER = 3  # steps logged before the signal is sent


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _submit(slurm, root: Path, name: str, teacher_dir: Path, corpus_file: Path, demo_cache: Path) -> tuple[str, Path]:
    run = root / name
    env = {"SAPLING_PYTHON": sys.executable, "NPROC_PER_NODE": "2", "SAPLING_RUN_DIR": str(run),
           "SAPLING_CACHE": str(demo_cache), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    slurm.env.update(env)
    res = slurm.run("sbatch", "--parsable", f"--job-name={name}", f"--chdir={root}", f"--output={root}/{name}.out",
                    str(REPO / "launchers" / "slurm.sbatch"), "distill", f"teacher.path={teacher_dir}",
                    "student.config.num_hidden_layers=1", f"data.files=[{corpus_file}]", "data.seq_len=32",
                    f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=2", "trainer.log_every=1",
                    "trainer.eval_batches=2", "trainer.eval_every=0", "trainer.save_every=1000",
                    "deepspeed=zero2", "logger=none", "trainer.progress=false")
    return res.stdout.strip().split(";")[0], run


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory, teacher_dir, corpus_file, demo_cache):
    root = tmp_path_factory.mktemp("sbatch")
    plain = _submit(slurm, root, "plain", teacher_dir, corpus_file, demo_cache)
    signalled = _submit(slurm, root, "signalled", teacher_dir, corpus_file, demo_cache)
    job, run = signalled
    deadline = time.monotonic() + 600
    while sum(r["event"] == "train" for r in _metrics(run)) < SIGNAL_AFTER:
        assert time.monotonic() < deadline, f"no training steps in {run}:\n{slurm.logs()}"
        assert slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), slurm.job(job)
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", job)
    out = {}
    for name, (job_id, run_dir) in (("plain", plain), ("signalled", signalled)):
        info = slurm.wait_state(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 600)
        out[name] = {"info": info, "run": run_dir, "log": (root / f"{name}.out").read_text()}
    return out


def test_sbatch_two_ranks_completes_with_model_and_metrics(jobs):
    job = jobs["plain"]
    assert job["info"]["JobState"] == "COMPLETED", job["log"][-3000:]
    assert job["info"]["Restarts"] == "0" and job["info"]["ExitCode"] == "0:0"
    assert "x 2 rank(s)" in job["log"]
    recs = _metrics(job["run"])
    assert [r["step"] for r in recs if r["event"] == "train"] == list(range(1, STEPS + 1))
    done = [r for r in recs if r["event"] == "done"]
    assert len(done) == 1 and done[0]["step"] == STEPS and done[0]["val_loss"] > 0
    model = AutoModelForCausalLM.from_pretrained(job["run"] / "model")
    assert model.config.num_hidden_layers == 1
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    # The run dir is pinned to the job's: every rank wrote into the one directory the script named.
    assert (job["run"] / "config.yaml").exists() and not (job["run"].parent / "outputs").exists()


def test_usr1_checkpoints_requeues_and_finishes_the_same_steps(jobs):
    job, plain = jobs["signalled"], jobs["plain"]
    assert job["info"]["JobState"] == "COMPLETED", job["log"][-3000:]
    assert job["info"]["Restarts"] == "1"
    assert "requeueing job" in job["log"] and "(restart 1)" in job["log"]
    recs = _metrics(job["run"])
    stopped = [r for r in recs if r["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGUSR1" and SIGNAL_AFTER <= stopped[0]["step"] < STEPS
    ckpt = [r for r in recs if r["event"] == "checkpoint" and r["step"] == stopped[0]["step"]]
    assert ckpt, "no checkpoint at the step the signal stopped"
    resumed = [r for r in recs if r["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] == stopped[0]["step"]
    steps = [r["step"] for r in recs if r["event"] == "train"]
    assert steps == list(range(1, STEPS + 1)), "steps lost or repeated across the requeue"
    done = [r for r in recs if r["event"] == "done"]
    plain_done = [r for r in _metrics(plain["run"]) if r["event"] == "done"]
    assert len(done) == 1 and done[0]["step"] == plain_done[0]["step"] == STEPS
    assert done[0]["val_loss"] == pytest.approx(plain_done[0]["val_loss"], rel=1e-5)
    assert not (job["run"] / ".stopped-by-signal").exists()
    assert os.path.isdir(job["run"] / "model")
