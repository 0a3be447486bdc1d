"""CLI smoke tests: each command runs end to end in a subprocess and writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_help(cli):
    res = cli("--help")
    assert res.returncode == 0
    assert "distill" in res.stdout and "pipeline" in res.stdout


def test_unknown_command(cli):
    res = cli("frobnicate")
    assert res.returncode == 2
    assert "unknown command" in res.stderr


def test_config_error_is_one_line(cli, teacher_dir, text_files):
    res = cli("distill", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]", "data.seq_len=0")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("sapling: config error")]
    assert lines == [lines[0]] and "data.seq_len=0" in lines[0] and "fix:" in lines[0]
    assert "Traceback" not in res.stderr


def test_vocab_mismatch_and_heads_fail_before_loading(cli_in_process, teacher_dir, text_files):
    res = cli_in_process("distill", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]",
                         "student.config.vocab_size=100")
    assert res.returncode == 2 and "student.config.vocab_size=100" in res.stderr
    res = cli_in_process("distill", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]",
                         "student.config.num_attention_heads=3")
    assert res.returncode == 2 and "num_attention_heads=3" in res.stderr and "num_key_value_heads" in res.stderr


def test_distill_then_eval(cli_in_process, tmp_path, teacher_dir, text_files):
    cli = cli_in_process  # through `sapling.cli.main`, in this process (the tests above start real ones)
    out = tmp_path / "run"
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    res = cli("distill", f"teacher.path={teacher_dir}", "student.config.num_hidden_layers=1", f"data.files={files}",
              "data.seq_len=64", "trainer.max_steps=4", "trainer.micro_batch_size=2", "trainer.log_every=1",
              "trainer.eval_batches=2", "logger=none", "hooks.post=[eval]", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 1
    assert (out / "model" / "tokenizer.json").exists()
    recs = _metrics(out)
    train = [r for r in recs if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["kd"] > 0 for r in train)
    assert "student" in (out / "report.md").read_text()

    ev = tmp_path / "eval"
    # the first 2,000 of the file's ~87k tokens: the report's rows are what is checked here (the numbers against a
    # direct computation: tests/eval/test_sliding_window_eval.py)
    res = cli("eval", f"model.path={out / 'model'}", f"teacher.path={teacher_dir}", f"data.files=[{text_files[-1]}]",
              "data.seq_len=64", "eval.max_tokens=2000", f"hydra.run.dir={ev}")
    assert res.returncode == 0, res.stderr[-3000:]
    report = (ev / "report.md").read_text()
    assert "| model |" in report and "| teacher |" in report


def test_train_from_scratch_with_wandb_offline(cli, tmp_path, tokenizer_dir, text_files):
    out = tmp_path / "train"
    res = cli("train", "model.tiny=qwen2-tiny", "model.config.vocab_size=384", f"data.tokenizer={tokenizer_dir}",
              f"data.files=[{text_files[-1]}]", "data.seq_len=32", "trainer.max_steps=3", "trainer.log_every=1",
              "trainer.micro_batch_size=2", "logger=wandb", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "model" / "config.json").exists()
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run directory missing"
    assert all(r["kd"] == 0 for r in _metrics(out) if r["event"] == "train")


def test_runtime_input_error_is_one_line(cli_in_process, tmp_path, teacher_dir):
    docs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for doc in docs:
        doc.write_text("too short for one block of 1024 tokens\n")
    res = cli_in_process("distill", f"teacher.path={teacher_dir}", f"data.files=[{docs[0]},{docs[1]}]",
                         "data.seq_len=1024", "logger=none")  # fits the model (checked before it loads), not the data
    assert res.returncode == 1
    assert "sapling: error:" in res.stderr and "seq_len" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("args,expected", [
    (["-m", "a=1,2", "b=3"], ["-m", "command=distill", "a=1,2", "b=3"]),
    (["a=1", "--cfg", "job", "-m", "~x", "--info", "plugins", "+y=-2"],
     ["--cfg", "job", "-m", "--info", "plugins", "command=distill", "a=1", "~x", "+y=-2"]),
    (["--config-dir=/x", "hydra/launcher=submitit_local"], ["--config-dir=/x", "command=distill",
                                                            "hydra/launcher=submitit_local"]),
])
def test_hydra_options_go_before_the_overrides(args, expected):
    from sapling.cli import _hydra_argv

    assert _hydra_argv("distill", args) == expected


def test_misspelled_key_is_one_line_naming_the_closest(sapling_main, teacher_dir, text_files):
    """Without `+` too: Hydra's own answer is a multi-line error advising `+trainer.max_step=1`."""
    code, err = sapling_main("distill", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]",
                             "trainer.max_step=1")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("sapling: config error: trainer.max_step=") and "trainer.max_steps?" in lines[0]
    code, err = sapling_main("distill", "trainr.lr=1")
    assert code == 2 and "did you mean trainer?" in err
