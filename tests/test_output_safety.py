"""Issue 17, findings 1, 2, 4, 5 and 16 (output_dir): no command destroys a user's work or silently redoes it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sapling.errors import OutputError
from sapling.io import check_output, claim_output, move_aside, read_run


def _train(run, out: Path, tokenizer_dir, text_files, *extra: str, env: dict | None = None) -> tuple[int, str]:
    return run("train", "model.tiny=llama-tiny", "model.config.vocab_size=384", "model.config.hidden_size=32",
               "model.config.num_hidden_layers=1", f"data.tokenizer={tokenizer_dir}", f"data.files=[{text_files[-1]}]",
               "data.seq_len=32", "trainer.micro_batch_size=2", "trainer.log_every=1", "trainer.eval_batches=1",
               "trainer.progress=false", "logger=none", f"output_dir={out}", f"hydra.run.dir={out.parent / 'hydra'}",
               *extra, env=env)


def _events(out: Path, event: str) -> list[dict]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["event"] == event]


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("sapling: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, tokenizer_dir, text_files, run_sapling):
    """A 2-step `sapling train` run with a checkpoint per step and a user's own file in it (run in this process)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    args = ["train", "model.tiny=llama-tiny", "model.config.vocab_size=384", "model.config.hidden_size=32",
            "model.config.num_hidden_layers=1", f"data.tokenizer={tokenizer_dir}", f"data.files=[{text_files[-1]}]",
            "data.seq_len=32", "trainer.micro_batch_size=2", "trainer.max_steps=2", "trainer.save_every=1",
            "trainer.eval_batches=1", "trainer.progress=false", "logger=none", f"output_dir={out}",
            f"hydra.run.dir={out.parent / 'hydra'}"]
    assert run_sapling(out.parent, *args) == 0, "sapling train failed (its stderr is in the captured output)"
    (out / "notes.txt").write_text("mine")
    return out


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_export_never_replaces_its_run_or_checkpoints(sapling_main, checkpointed_run):
    run = checkpointed_run
    before = _snapshot(run)
    code, err = sapling_main("export", f"checkpoint={run}", f"output={run}")
    assert code == 1 and "contains the input checkpoint" in _one_error_line(err)
    code, err = sapling_main("export", f"checkpoint={run / 'checkpoints' / 'global_step1'}", f"output={run / 'checkpoints'}")
    assert code == 1 and "checkpoint" in _one_error_line(err)
    code, err = sapling_main("export", f"checkpoint={run}", f"output={run / 'checkpoints' / 'mine'}")
    assert code == 1 and "inside the training checkpoints folder" in _one_error_line(err)
    assert _snapshot(run) == before and (run / "notes.txt").read_text() == "mine"
    # a directory of the user's is refused; the default export location is written, and may be rewritten
    user_dir = run.parent / "user_dir"
    user_dir.mkdir()
    (user_dir / "keep.txt").write_text("x")
    code, err = sapling_main("export", f"checkpoint={run}", f"output={user_dir}")
    assert code == 1 and "Sapling did not write (keep.txt)" in _one_error_line(err)
    assert (user_dir / "keep.txt").exists()
    for _ in range(2):
        code, err = sapling_main("export", f"checkpoint={run}")
        assert code == 0, err[-3000:]
    assert (run / "export" / "global_step2" / "config.json").exists()
    assert read_run(run / "export" / "global_step2")["command"] == "export"


def test_quantize_never_overwrites_its_input(sapling_main, checkpointed_run, text_files):
    run = checkpointed_run
    config_before = (run / "config.yaml").read_text()
    model_before = _snapshot(run / "model")
    code, err = sapling_main("quantize", f"model.path={run / 'model'}", f"output_dir={run}", "quant.method=rtn", "quant.eval=false",
              "quant.group_size=32")
    assert code == 1
    assert "contains the input model.path" in _one_error_line(err)
    assert (run / "config.yaml").read_text() == config_before and _snapshot(run / "model") == model_before


def test_output_dir_that_is_a_file_or_another_commands_run(sapling_main, checkpointed_run, teacher_dir, text_files, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    code, err = sapling_main("eval", f"model.path={teacher_dir}", f"data.files=[{text_files[0]}]", f"output_dir={f}")
    assert code == 1 and "is a file, not a directory" in _one_error_line(err)
    code, err = sapling_main("eval", f"model.path={teacher_dir}", f"data.files=[{text_files[0]}]", f"output_dir={checkpointed_run}")
    assert code == 1 and "already holds a `sapling train` run" in _one_error_line(err)


def test_resume_false_refuses_and_overwrite_moves_aside(sapling_main, tmp_path, tokenizer_dir, text_files):
    out = tmp_path / "run"
    code, err = _train(sapling_main, out, tokenizer_dir, text_files, "trainer.max_steps=2", "trainer.save_every=1")
    assert code == 0, err[-3000:]
    before = _snapshot(out)
    code, err = _train(sapling_main, out, tokenizer_dir, text_files, "trainer.max_steps=2", "trainer.resume=false")
    assert code == 1 and "trainer.resume=false would start over" in _one_error_line(err)
    assert _snapshot(out) == before
    code, err = _train(sapling_main, out, tokenizer_dir, text_files, "trainer.max_steps=2", "trainer.resume=false",
                 "trainer.overwrite=true")
    assert code == 0, err[-3000:]
    aside = list(out.glob("replaced-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "latest").exists()
    assert [r["step"] for r in _events(out, "train")] == [1, 2]  # a new metrics.jsonl, not appended
    assert len(_events(aside[0], "train")) == 2


def test_finished_run_is_not_retrained_and_stale_latest_is_fixed(sapling_main, tmp_path, tokenizer_dir, text_files):
    out = tmp_path / "run"
    stop = {"SAPLING_FAULT_SIGNAL_AT_STEP": "2"}
    code, err = _train(sapling_main, out, tokenizer_dir, text_files, "trainer.max_steps=4", env=stop)
    assert _events(out, "stopped"), err[-3000:]
    code, err = _train(sapling_main, out, tokenizer_dir, text_files, "trainer.max_steps=4")  # resumes at 2, finishes at 4
    assert code == 0, err[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step4"  # not the stale step 2
    assert read_run(out)["finished_step"] == 4
    weights = (out / "model" / "model.safetensors").read_bytes()
    n_train = len(_events(out, "train"))
    code, err = _train(sapling_main, out, tokenizer_dir, text_files, "trainer.max_steps=4")
    assert code == 0 and "already finished at step 4" in err
    code, err = _train(sapling_main, out, tokenizer_dir, text_files, "trainer.max_steps=3")
    assert code == 1 and "finished at step 4" in _one_error_line(err)
    assert len(_events(out, "train")) == n_train and (out / "model" / "model.safetensors").read_bytes() == weights
    code, err = _train(sapling_main, out, tokenizer_dir, text_files, "trainer.max_steps=5")  # continues from the final state
    assert code == 0, err[-3000:]
    assert _events(out, "resume")[-1]["step"] == 4
    assert [r["step"] for r in _events(out, "train")][n_train:] == [5]


def test_resumed_prune_run_does_not_prune_again(sapling_main, tmp_path, teacher_dir, text_files):
    out = tmp_path / "run"
    args = ("distill", f"teacher.path={teacher_dir}", "hooks.pre=[prune]", "prune.target.intermediate_size=64",
            "prune.calibration.samples=8", f"data.files=[{text_files[-1]}]", "data.seq_len=32",
            "trainer.micro_batch_size=2", "trainer.max_steps=3", "trainer.eval_batches=1", "trainer.progress=false",
            "trainer.log_every=1", "logger=none", f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}")
    code, err = sapling_main(*args, env={"SAPLING_FAULT_SIGNAL_AT_STEP": "1"})
    assert _events(out, "stopped"), err[-3000:]
    assert len(_events(out, "prune")) == 1
    code, err = sapling_main(*args)
    assert code == 0, err[-3000:]
    assert len(_events(out, "prune")) == 1, "the resumed run calibrated and pruned again"
    assert _events(out, "prune_resumed")[0]["shape"]["intermediate_size"] == 64
    assert [r["step"] for r in _events(out, "train")] == [1, 2, 3]


def test_check_output_rules(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="is the input"):
        check_output("output_dir", src, command="quantize", inputs=[("model.path", src)])
    with pytest.raises(OutputError, match="lies inside the input"):
        check_output("output_dir", src / "q", command="quantize", inputs=[("model.path", src)])
    new = claim_output("output_dir", tmp_path / "new" / "deeper", command="eval")
    assert read_run(new)["command"] == "eval"
    assert claim_output("output_dir", new, command="eval") == new  # the same command may write again
    (new / "report.md").write_text("r")
    with pytest.raises(OutputError, match="`sapling eval` run"):
        check_output("output_dir", new, command="prune")
    hydra_only = tmp_path / "hydra_dir"
    (hydra_only / ".hydra").mkdir(parents=True)
    (hydra_only / "sapling-eval.log").write_text("")
    check_output("output_dir", hydra_only, command="eval")  # Hydra's own files are not the user's
    moved = move_aside(new)
    assert moved is not None and (moved / "report.md").exists() and not (new / "report.md").exists()


def test_unwritable_output_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match="not writable"):
        check_output("output_dir", tmp_path / "out", command="eval")
