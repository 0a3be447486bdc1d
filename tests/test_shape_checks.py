"""Shapes, lengths and keys are checked before any model loads: one `config error` line and exit code 2,
nothing written (issue 17, findings 6-9). Each of these used to run, train, and fail late or not at all."""

from __future__ import annotations

import re

import pytest


@pytest.fixture
def cli(cli_in_process):
    """In this process: every case here is refused or fails within seconds (see conftest.cli_in_process)."""
    return cli_in_process


QUIET = ("logger=none", "trainer.progress=false", "trainer.max_steps=2")


def assert_refused(res, key: str, *parts: str) -> str:
    """Exit 2 with exactly one `sapling:` line naming `key` (and `parts`); returns that line."""
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("sapling")]
    assert len(lines) == 1, res.stderr[-3000:]
    assert re.search(rf"(^|\s){re.escape(key)}=", lines[0]), lines[0]
    assert "Traceback" not in res.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def test_prune_target_that_transformers_refuses(cli, tmp_path, teacher_dir, text_files):
    """hidden_size=62 with 4 heads passed the old checks, pruned, and failed in save_pretrained."""
    out = tmp_path / "out"
    res = cli("prune", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]", "prune.target.hidden_size=62",
              *QUIET, f"output_dir={out}")
    assert_refused(res, "prune.target.hidden_size", "LlamaConfig", "60 or 64")
    assert not out.exists()  # refused before the output dir, data or any model


def test_pipeline_kv_groups_checked_before_the_teacher_trains(cli, tmp_path, tokenizer_dir, text_files):
    """The demo teacher (8 heads, 4 KV groups, hidden 256) and its `hooks.pre=[prune]`: 3 KV groups keep 6 heads,
    which LlamaConfig refuses; this used to train the teacher, prune, distil, and fail at save."""
    out = tmp_path / "out"
    res = cli("pipeline", f"data.files=[{text_files[0]}]", f"data.tokenizer={tokenizer_dir}",
              "prune.target.num_attention_heads=null", "prune.target.num_key_value_heads=3", *QUIET, f"output_dir={out}")
    assert_refused(res, "prune.target.num_key_value_heads", "valid values: 1, 2, 4")
    assert not (out / "teacher").exists() and not (out / "distill").exists()


def test_student_path_with_prune_hook_is_refused(cli, tmp_path, teacher_dir, text_files):
    out = tmp_path / "out"
    res = cli("distill", f"teacher.path={teacher_dir}", f"student.path={teacher_dir}", "hooks.pre=[prune]",
              "prune.target.num_hidden_layers=1", f"data.files=[{text_files[0]}]", *QUIET, f"output_dir={out}")
    assert_refused(res, "student.path", "hooks.pre=[prune]")
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "distill"])
def test_seq_len_beyond_the_models_positions(cli, tmp_path, teacher_dir, tokenizer_dir, text_files, command):
    """The tiny models have max_position_embeddings=1024; `sapling eval` refused 2048, training did not."""
    out = tmp_path / "out"
    source = ([f"teacher.path={teacher_dir}", "student.config.num_hidden_layers=1"] if command == "distill"
              else ["model.tiny=llama-tiny", f"data.tokenizer={tokenizer_dir}"])
    res = cli(command, *source, f"data.files=[{text_files[0]}]", "data.seq_len=2048", *QUIET, f"output_dir={out}")
    assert_refused(res, "data.seq_len", "max_position_embeddings (1024)", "data.seq_len=1024")
    assert not out.exists()


def test_plus_key_with_a_typo_is_refused(cli, tmp_path, teacher_dir, text_files):
    """Hydra's advice for `trainer.max_step=1` is `+trainer.max_step=1`, which then ran 100 steps."""
    out = tmp_path / "out"
    res = cli("distill", f"teacher.path={teacher_dir}", "student.config.num_hidden_layers=1",
              f"data.files=[{text_files[0]}]", "+trainer.max_step=1", *QUIET, f"output_dir={out}")
    assert_refused(res, "trainer.max_step", "did you mean trainer.max_steps")
    assert not out.exists()


def test_plus_hf_field_with_a_typo_is_refused(cli, tmp_path, teacher_dir, text_files):
    """`+student.config.num_hiden_layers=2` trained the teacher's depth and wrote the typo into config.json."""
    out = tmp_path / "out"
    res = cli("distill", f"teacher.path={teacher_dir}", f"data.files=[{text_files[0]}]",
              "+student.config.num_hiden_layers=2", *QUIET, f"output_dir={out}")
    assert_refused(res, "student.config.num_hiden_layers", "LlamaConfig", "did you mean student.config.num_hidden_layers")
    assert not out.exists()
