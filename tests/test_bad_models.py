"""Model paths that cannot be loaded fail in config validation with one line naming the key and the fix.

A file instead of a checkpoint directory, a directory with a config but no weights, a truncated safetensors
file, a hub id while offline (HF_HUB_OFFLINE=1, set by conftest) or with the hub unreachable, and
`sapling quantize` of an export that is already quantized. Before, each was a transformers/safetensors
traceback (the hub id after half a minute of retries). What validation cannot see (an unreadable config,
a directory without tokenizer files) is a ModelSourceError where the model loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sapling.config import check_model_path
from sapling.errors import ConfigError, ModelSourceError


@pytest.fixture
def cli(cli_in_process):
    """In this process: every case here is refused or fails within seconds (see conftest.cli_in_process)."""
    return cli_in_process


def _config_error(res, *needles: str) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("sapling: config error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _copy(teacher_dir: Path, dest: Path, *names: str) -> Path:
    dest.mkdir()
    for name in names or [p.name for p in teacher_dir.iterdir()]:
        shutil.copy(teacher_dir / name, dest / name)
    return dest


@pytest.mark.parametrize("case", ["file", "no_weights", "truncated", "offline_hub"])
def test_bad_teacher_path(cli, tmp_path, teacher_dir, text_files, case):
    if case == "file":
        path, needles = teacher_dir / "config.json", ["is a file", f"(e.g. {teacher_dir})"]
    elif case == "no_weights":
        path = _copy(teacher_dir, tmp_path / "cfg_only", "config.json", "tokenizer.json", "tokenizer_config.json")
        needles = ["no weights", "teacher.init=random"]
    elif case == "truncated":
        path = _copy(teacher_dir, tmp_path / "truncated")
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        needles = ["model.safetensors is truncated", "download the checkpoint again"]
    else:
        path, needles = "no-such-org/no-such-model", ["offline (HF_HUB_OFFLINE=1)", "download it first"]
    res = cli("distill", f"teacher.path={path}", f"data.files=[{text_files[-1]}]", "data.seq_len=32",
              "trainer.max_steps=1", "logger=none", timeout=120)
    _config_error(res, "teacher.path=", *needles)


def test_quantize_an_already_quantized_export(cli, tmp_path, teacher_dir, text_files):
    """A compressed-tensors export carries a quantization_config in its config.json."""
    export = _copy(teacher_dir, tmp_path / "int4")
    config = json.loads((export / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (export / "config.json").write_text(json.dumps(config))
    res = cli("quantize", f"model.path={export}", f"data.files=[{text_files[-1]}]", timeout=120)
    _config_error(res, "model.path=", "already quantized", "full-precision model")


def test_unreachable_hub_fails_fast(monkeypatch):
    """Not offline, but nothing answers at the endpoint: refused within seconds, not after retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(ConfigError, match=r"teacher.path=.*hub is unreachable \(127.0.0.1:9.*download it first"):
        check_model_path("teacher.path", "no-such-org/no-such-model")


def test_unreadable_config_and_missing_tokenizer_at_load(tmp_path, teacher_dir):
    from sapling.models import load_tokenizer, source_config

    broken = _copy(teacher_dir, tmp_path / "broken_config")
    (broken / "config.json").write_text('{"model_type": "llama", ')
    src = OmegaConf.create({"path": str(broken), "tiny": None, "config": {}})
    with pytest.raises(ModelSourceError, match=r"cannot read the model config of .*broken_config"):
        source_config(src)
    no_tok = _copy(teacher_dir, tmp_path / "no_tokenizer", "config.json", "model.safetensors")
    with pytest.raises(ModelSourceError, match=r"cannot load a tokenizer from .*no_tokenizer.*data.tokenizer="):
        load_tokenizer(str(no_tok))
