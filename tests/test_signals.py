"""One signal policy: SIGTERM, SIGUSR1/2 and Ctrl-C stop a run at the next safe point after a checkpoint and
exit 3 ("stopped, resumable"); a second Ctrl-C aborts at once (exit 130); a rerun of the same command resumes.

The signals are raised inside the training process after a chosen optimizer step (the loop's test-only fault
injection, `SAPLING_FAULT_SIGNAL_AT_STEP` / `SAPLING_FAULT_SIGNAL`), so each run stops at a known step.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from sapling.errors import EXIT_ABORTED, EXIT_STOPPED
from sapling.faults import FAULT_SIGNAL_ENV, FAULT_SIGNAL_NAME_ENV
from sapling.train.loop import StopRequest


def _records(run: Path, event: str) -> list[dict]:
    path = run / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event] if path.exists() else []


def _fault(step: int | str, names: str) -> dict[str, str]:
    return {FAULT_SIGNAL_ENV: str(step), FAULT_SIGNAL_NAME_ENV: names}


def test_ctrl_c_then_a_stop_at_the_last_step_checkpoint_exit_3_and_the_rerun_finishes(cli, tmp_path, teacher_dir,
                                                                                       text_files):
    run = tmp_path / "run"
    args = ["distill", f"teacher.path={teacher_dir}", "student.config.num_hidden_layers=1",
            f"data.files=[{text_files[0]},{text_files[1]}]", "data.seq_len=32", "trainer.max_steps=3",
            "trainer.micro_batch_size=2", "trainer.log_every=1", "trainer.eval_batches=1", "eval.batches=1",
            "hooks.post=[eval]", "logger=none", "trainer.progress=false", f"hydra.run.dir={run}"]
    # Ctrl-C after step 2; trainer.save_every=0 (the default), so the stop writes the only checkpoint
    res = cli(*args, env=_fault(2, "INT"))
    assert res.returncode == EXIT_STOPPED, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "KeyboardInterrupt" not in res.stderr
    assert "stopping after this step; Ctrl-C again to abort" in res.stderr
    assert "stopped by a signal after step 2" in res.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step2"
    assert [r["signal"] for r in _records(run, "stopped")] == ["SIGINT"]
    assert not (run / "model").exists()

    # resumed; SIGTERM during the last step: checkpoint and stop before the final export and the post-hooks
    res = cli(*args, env=_fault(3, "TERM"))
    assert res.returncode == EXIT_STOPPED, res.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step3"
    assert not (run / "model").exists() and not (run / "report.md").exists()

    # the rerun trains nothing more, exports the model and runs the post-hook
    res = cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in _records(run, "resume")] == [2, 3]
    assert [r["step"] for r in _records(run, "train")] == [1, 2, 3]
    assert (run / "model" / "config.json").exists() and (run / "report.md").exists()


def test_second_ctrl_c_aborts_at_once_with_one_line(cli, tmp_path, tokenizer_dir, text_files):
    run = tmp_path / "run"
    res = cli("train", "model.tiny=qwen2-tiny", "model.config.vocab_size=384", f"data.tokenizer={tokenizer_dir}",
              f"data.files=[{text_files[-1]}]", "data.seq_len=32", "trainer.max_steps=1000", "trainer.log_every=1",
              "trainer.micro_batch_size=2", "logger=none", "trainer.progress=false", f"hydra.run.dir={run}",
              env=_fault(2, "INT,INT"))
    assert res.returncode == EXIT_ABORTED, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    aborted = [ln for ln in res.stderr.splitlines() if "aborted" in ln]
    assert len(aborted) == 1 and aborted[0].startswith("sapling train: aborted by Ctrl-C"), res.stderr[-3000:]
    # at once: not even step 2's record, no checkpoint, no stop record
    assert [r["step"] for r in _records(run, "train")] == [1]
    assert not (run / "checkpoints").exists() and not _records(run, "stopped")


# tests/test_pipeline.py's toy demo (the same teacher and trainer keys, so the session's cache may already hold
# the teacher), with a random student (no pruning), RTN and no generation timing: the stages are tested here.
PIPELINE = [
    "pipeline.corpus.max_bytes=300000", "pipeline.corpus.vocab_size=320", "pipeline.teacher_steps=12",
    "teacher.config.hidden_size=64", "teacher.config.intermediate_size=128", "teacher.config.num_hidden_layers=2",
    "teacher.config.num_attention_heads=4", "teacher.config.num_key_value_heads=2", "hooks.pre=[]",
    "student.config.hidden_size=32", "student.config.intermediate_size=64", "student.config.num_hidden_layers=1",
    "student.config.num_attention_heads=2", "student.config.num_key_value_heads=1", "data.seq_len=32",
    "trainer.max_steps=6", "trainer.micro_batch_size=4", "trainer.log_every=2", "trainer.eval_every=3",
    "trainer.eval_batches=2", "eval.batches=4", "eval.gen_tokens=0", "logger=none", "quant.group_size=32",
    "quant.method=rtn", "quant.guided=false",
]


def test_a_stop_stops_the_whole_pipeline_and_the_rerun_resumes_it(cli, tmp_path):
    run = tmp_path / "pipe"
    args = ["pipeline", *PIPELINE, f"hydra.run.dir={run}"]
    res = cli(*args, env=_fault("distill:4", "TERM"))
    assert res.returncode == EXIT_STOPPED, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert (run / "distill" / "checkpoints" / "latest").read_text().strip() == "global_step4"
    assert not (run / "distill" / "model").exists()
    assert not (run / "scratch").exists() and not (run / "report.md").exists()  # the pipeline went no further
    assert [(r["stage"], r["signal"]) for r in _records(run, "stopped")] == [("distill", "SIGTERM")]

    res = cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in _records(run / "distill", "resume")] == [4]
    assert [r["step"] for r in _records(run / "distill", "train")] == [2, 4, 6]  # log_every=2, none repeated
    for done in ("distill/model", "scratch/model", "model-w4a16", "model"):
        assert (run / done / "config.json").exists(), done
    assert "student (CE from scratch)" in (run / "report.md").read_text()


def test_nested_stop_requests_share_one_state():
    """The pipeline's request (between stages) and the loop's (inside a stage) never lose a signal."""
    before = signal.getsignal(signal.SIGINT)
    with StopRequest(pause="stage") as outer:
        signal.raise_signal(signal.SIGUSR1)  # between stages (calibration, quantization, eval)
        assert outer.signum == signal.SIGUSR1
        with StopRequest() as inner:
            assert inner.signum == signal.SIGUSR1  # a loop started now stops after its first step
    with StopRequest() as outer:
        with StopRequest() as inner:
            signal.raise_signal(signal.SIGINT)  # first Ctrl-C inside the loop: a stop request
            assert inner.signum == signal.SIGINT
        assert outer.signum == signal.SIGINT and outer.interrupts == 1
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the second, between stages: abort
    assert signal.getsignal(signal.SIGINT) is before
