"""Progress and noise: per-command help, progress bars on the long steps, the resume line, no third-party
start-up noise (DeepSpeed, Hydra, wandb), and outputs whose file modes follow the umask (issue 17, 18-20)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from importlib.resources import files as resource_files
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sapling.cli import main
from sapling.config import COMMANDS, register_configs
from sapling.io import publish

# Keys each command's help must name (a few of its main ones).
HELP_KEYS = {
    "pipeline": ("experiment", "pipeline.teacher_steps", "trainer.max_steps"),
    "train": ("model.path", "model.tiny", "data.files", "trainer.max_steps", "trainer.eval_tokens"),
    "distill": ("teacher.path", "student.path", "student.config", "hooks.pre", "distill.temperature"),
    "prune": ("teacher.path", "prune.target", "prune.calibration.samples", "prune.importance"),
    "quantize": ("model.path", "quant.scheme", "quant.group_size", "quant.guided"),
    "eval": ("model.path", "teacher.path", "eval.window", "eval.max_tokens"),
    "cache-teacher": ("teacher.path", "cache.dir", "cache.top_k"),
    "export": ("checkpoint", "output"),
    "sweep-report": ("<multirun dir>", "output"),
}


def test_every_command_has_its_own_help(capsys):
    assert set(HELP_KEYS) == {*COMMANDS, "export", "sweep-report"}
    for command, keys in HELP_KEYS.items():
        for flag in ("--help", "-h") if command in ("distill", "export") else ("--help",):
            main([command, flag])  # returns: exit 0
            out = capsys.readouterr().out
            assert out.startswith(f"usage: sapling {command}"), (command, out[:200])
            assert all(k in out for k in keys), (command, [k for k in keys if k not in out])
            assert "examples:" in out and f"sapling {command}" in out.split("examples:")[1]
            assert "Powered by Hydra" not in out and "== Config ==" not in out  # not Hydra's generic help
    main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "trainer.eval_tokens" in out and "(default: 32768)" in out  # defaults come from the composed config


@pytest.mark.parametrize("command", ["export", "sweep-report", "distill"])
def test_help_exits_zero_from_the_command_line(cli, command):
    res = cli(command, "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"usage: sapling {command}") and all(k in res.stdout for k in HELP_KEYS[command])
    assert res.stderr == ""


def test_hydra_cfg_job_still_prints_the_config(cli):
    res = cli("distill", "--cfg", "job", "trainer.max_steps=7")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "max_steps: 7" in res.stdout and "eval_tokens: 32768" in res.stdout


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_a_run_is_quiet_shows_progress_and_writes_readable_outputs(tmp_path, teacher_dir, text_files, demo_cache):
    """`sapling distill hooks.pre=[prune]` with wandb: calibration and post-prune validation show progress bars;
    no DeepSpeed accelerator warning, no Hydra deprecation warning, no wandb history/summary panel; the
    exported model directory is 0755 and its files 0644 under umask 022 (not mkdtemp's 0700 and 0600)."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_QUIET", "DS_ACCELERATOR")}
    env.update(WANDB_MODE="offline", SAPLING_CACHE=str(demo_cache), PYTHONUNBUFFERED="1")
    files = "[" + ",".join(str(p) for p in text_files) + "]"
    args = [sys.executable, "-m", "sapling", "distill", f"teacher.path={teacher_dir}", "hooks.pre=[prune]",
            "prune.target.num_hidden_layers=1", "prune.calibration.samples=8", "prune.calibration.batch_size=4",
            f"data.files={files}", "data.seq_len=32", "trainer.max_steps=2", "trainer.micro_batch_size=2",
            "trainer.eval_every=0", "trainer.eval_tokens=64", "logger=wandb", f"hydra.run.dir={out}"]
    old = os.umask(0o022)
    try:
        res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    both = res.stdout + res.stderr
    assert "prune: calibration" in res.stderr and "prune: validation" in res.stderr  # tqdm bars, on stderr
    assert "accelerator" not in both, both[-3000:]  # DeepSpeed: "Setting accelerator to CPU. If you have GPU ..."
    assert "deprecat" not in both.lower() and "Hydra" not in both, both[-3000:]
    assert "Run summary" not in both and "Run history" not in both, both[-3000:]  # wandb's finish panel
    assert "less than the current step" not in both  # step-less records no longer push wandb's step ahead
    assert (out / "wandb").is_dir()  # wandb still ran, quietly
    modes = _modes(out / "model")
    assert modes.pop(".") == 0o755, oct(stat.S_IMODE((out / "model").stat().st_mode))
    assert modes and all(m == 0o644 for m in modes.values()), {k: oct(m) for k, m in modes.items()}
    assert stat.S_IMODE((out / "prune_scores.pt").stat().st_mode) == 0o644


def test_publish_follows_the_umask(tmp_path):
    tmp = Path(tempfile.mkdtemp(dir=tmp_path))
    (tmp / "sub").mkdir()
    fd, name = tempfile.mkstemp(dir=tmp / "sub")
    os.close(fd)
    old = os.umask(0o027)
    try:
        publish(tmp)
    finally:
        os.umask(old)
    assert stat.S_IMODE(tmp.stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp / "sub").stat().st_mode) == 0o750
    assert stat.S_IMODE(Path(name).stat().st_mode) == 0o640


def test_calibration_and_search_show_progress(capsys):
    """Unit level: the calibration bar (and the layer-drop loss bar) appear with progress=True, not without."""
    from transformers import AutoModelForCausalLM

    from sapling.models import tiny_config
    from sapling.prune.importance import estimate_importance

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama-tiny", vocab_size=64, hidden_size=32,
                                                         num_hidden_layers=2))
    batches = [{"input_ids": torch.randint(0, 64, (2, 8))} for _ in range(3)]
    estimate_importance(model, iter(batches), layer_loss=True, progress=True, total=3)
    err = capsys.readouterr().err
    assert "prune: calibration" in err and "3/3" in err and "prune: layer-drop loss" in err
    estimate_importance(model, iter(batches), progress=False)
    assert capsys.readouterr().err == ""


def test_resume_says_from_which_step(tmp_path, tokenizer, corpus_file, capsys, monkeypatch):
    """A resumed run prints `resuming from step N` (stderr, rank 0) before training on."""
    from sapling.data import build_packed_data
    from sapling.models import build_model, source_config
    from sapling.train.engine import LocalEngine
    from sapling.train.loop import fit
    from sapling.train.metrics import MetricsLogger

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(resource_files("sapling.conf")), version_base=None):
        cfg = compose(config_name="config", overrides=[
            "command=train", f"output_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}", "logger=none",
            "trainer.progress=false", "model.tiny=llama-tiny", "model.config.num_hidden_layers=1",
            "model.config.hidden_size=32", f"model.config.vocab_size={len(tokenizer)}", "trainer.max_steps=2",
            "trainer.micro_batch_size=2", "trainer.save_every=1", "trainer.eval_every=0", "trainer.eval_tokens=64"])
    data = build_packed_data([str(corpus_file)], tokenizer, 16, val_fraction=0.1, seed=0, max_tokens=4000,
                             cache_dir=str(tmp_path / "data"))

    def run() -> None:
        model = build_model(cfg.model, source_config(cfg.model), torch.device("cpu"), seed=0)
        metrics = MetricsLogger(tmp_path, None)
        try:
            fit(cfg, student=model, teacher=None, tokenizer=tokenizer, data=data, output_dir=tmp_path,
                metrics=metrics, device=torch.device("cpu"))
        finally:
            metrics.close()

    original, calls = LocalEngine.step, {"n": 0}

    def crash_in_step_2(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(self)

    monkeypatch.setattr(LocalEngine, "step", crash_in_step_2)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()
    assert "resuming" not in capsys.readouterr().err
    run()
    assert "resuming from step 1 of 2" in capsys.readouterr().err
