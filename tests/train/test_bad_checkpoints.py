"""Damaged or mismatched training checkpoints are one line naming the file and step, and what to do instead.

One 2-step `sapling train` with `trainer.save_every=1` (checkpoints global_step1 and global_step2); each test
damages a copy of it: a truncated engine state, client state or RNG file, a `latest` naming a missing
directory, a rerun with another student shape into the same output_dir, and `sapling export` of a
truncated checkpoint. Before, each was a torch/pickle traceback.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sapling.errors import CheckpointError
from sapling.train.checkpoint import LATEST, STATE_FILE, latest_tag, load_checkpoint_file, read_state


@pytest.fixture
def cli(cli_in_process):
    """In this process: every case here is refused or fails within seconds (see conftest.cli_in_process)."""
    return cli_in_process


def _train_args(tokenizer_dir: Path, text_files: list[Path]) -> list[str]:
    return ["model.tiny=qwen2-tiny", "model.config.vocab_size=384", f"data.tokenizer={tokenizer_dir}",
            f"data.files=[{text_files[-1]}]", "data.seq_len=32", "data.max_tokens=4000",
            "trainer.micro_batch_size=2", "trainer.save_every=1", "trainer.eval_batches=1", "logger=none",
            "trainer.progress=false"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tokenizer_dir, text_files, run_sapling) -> Path:
    out = tmp_path_factory.mktemp("bad_ckpt") / "run"
    code = run_sapling(out.parent, "train", *_train_args(tokenizer_dir, text_files), "trainer.max_steps=2",
                       f"hydra.run.dir={out}")  # in this process
    assert code == 0, "sapling train failed (its stderr is in the captured output)"
    assert (out / "checkpoints" / "global_step1" / STATE_FILE).exists()
    assert (out / "checkpoints" / LATEST).read_text().strip() == "global_step2"
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run", symlinks=True))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("sapling: error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_resume_from_truncated_engine_state(cli, run_copy, tokenizer_dir, text_files):
    _truncate(run_copy / "checkpoints" / "global_step2" / "engine.pt")
    res = cli("train", *_train_args(tokenizer_dir, text_files), "trainer.max_steps=3", f"hydra.run.dir={run_copy}")
    _one_line_error(res, "global_step2/engine.pt", "truncated or corrupt", "echo global_step1 >",
                    "trainer.overwrite=true")


def test_resume_into_another_student_shape(cli, run_copy, tokenizer_dir, text_files):
    res = cli("train", *_train_args(tokenizer_dir, text_files), "model.config.intermediate_size=64",
              "trainer.max_steps=3", f"hydra.run.dir={run_copy}")
    _one_line_error(res, "global_step2", "another shape", "intermediate_size=128 (this run: 64)",
                    "trainer.overwrite=true")


def test_export_of_truncated_checkpoint(cli, run_copy, tmp_path):
    _truncate(run_copy / "checkpoints" / "global_step2" / "engine.pt")
    res = cli("export", f"checkpoint={run_copy}", f"output={tmp_path / 'exported'}")
    _one_line_error(res, "global_step2/engine.pt", f"checkpoint={run_copy / 'checkpoints' / 'global_step1'}")
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("damage", ["state", "rng", "latest"])
def test_damaged_files_name_file_step_and_fix(run_copy, damage):
    """The same errors one level down (what the commands above call), for the other files of a checkpoint."""
    root = run_copy / "checkpoints"
    if damage == "state":
        _truncate(root / "global_step2" / STATE_FILE)
        with pytest.raises(CheckpointError, match=rf"{STATE_FILE} .*global_step2.*truncated.*global_step1"):
            read_state(latest_tag(root))
    elif damage == "rng":
        _truncate(root / "global_step2" / "rng" / "rank0.pt")
        with pytest.raises(CheckpointError, match=r"rank0\.pt \(RNG state of checkpoint global_step2\).*global_step1"):
            load_checkpoint_file(root / "global_step2" / "rng" / "rank0.pt", "RNG state")
    else:
        shutil.rmtree(root / "global_step2")
        with pytest.raises(CheckpointError, match=r"names 'global_step2'.*echo global_step1 >"):
            latest_tag(root)
