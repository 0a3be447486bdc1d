"""Hydra sweeps through submitit (`hydra/launcher=submitit_local`) and `sapling sweep-report`."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sapling.eval.sweep import find_jobs, sweep_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY = re.compile(r"rank (\d)/2 on \S+: step (\d+), train loss ([-+0-9.eEna]+), val loss ([-+0-9.eEna]+)")


def test_submitit_local_sweep_of_two_jobs_each_two_ranks_then_report(cli, tmp_path, teacher_dir, corpus_file):
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    res = cli("distill", "-m", "distill.temperature=1,2", "hydra/launcher=submitit_local",
              "hydra.launcher.tasks_per_node=2", "deepspeed=zero2", f"teacher.path={teacher_dir}",
              "student.config.num_hidden_layers=1", f"data.files=[{corpus_file}]", "data.seq_len=32",
              "trainer.max_steps=6", "trainer.eval_every=3", "trainer.micro_batch_size=2", "trainer.eval_batches=2",
              "logger=none", "trainer.progress=false", "hydra.sweep.dir=sweep", env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sweep = tmp_path / "sweep"
    for num, temperature in (("0", 1.0), ("1", 2.0)):
        job = sweep / num
        assert OmegaConf.load(job / "config.yaml").distill.temperature == temperature
        done = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()
                if '"done"' in line]
        assert len(done) == 1 and done[0]["step"] == 6
        assert (job / "model" / "config.json").exists()
        # cumulative FLOPs on the validation records: linear in steps, the teacher's forward on top
        evals = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
        assert [r["step"] for r in evals] == [3, 6]
        assert done[0]["flops"] == pytest.approx(2 * evals[0]["flops"]) and done[0]["flops"] > done[0]["student_flops"]
    # Each job was its own submitit job of 2 tasks forming one world of 2 ranks (one log per task).
    logs = sorted(sweep.glob(".submitit/*/*_log.out"))
    assert len(logs) == 4, logs
    per_job: dict[str, list] = {}
    for log in logs:
        per_job.setdefault(log.parent.name, []).extend(SUMMARY.findall(log.read_text()))
    assert len(per_job) == 2
    for lines in per_job.values():
        assert sorted(m[0] for m in lines) == ["0", "1"]
        assert lines[0][1:] == lines[1][1:]  # both ranks saw the same final step, loss and val loss

    rep = cli("sweep-report", str(sweep))
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "| job | distill.temperature | state |" in rep.stdout
    rows = list(csv.DictReader((sweep / "sweep_report.csv").open()))
    assert [(r["job"], r["distill.temperature"], r["state"], r["step"]) for r in rows] == [
        ("0", "1", "done", "6"), ("1", "2", "done", "6")]
    for r, num in zip(rows, ("0", "1")):
        done = [json.loads(line) for line in (sweep / num / "metrics.jsonl").read_text().splitlines()
                if '"done"' in line][0]
        assert float(r["val_loss"]) == pytest.approx(done["val_loss"])
    png = (sweep / "sweep_val_loss.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert "sweep_val_loss.png" in (sweep / "sweep_report.md").read_text()


def _job(root: Path, name: str, overrides: list[str], records: list[dict], tail: str = "") -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if records or tail:
        (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return job


def test_report_states_ordering_and_varying_columns(tmp_path):
    ev = [{"event": "train", "step": 1, "tokens": 10, "loss": 3.0},
          {"event": "eval", "step": 1, "tokens": 10, "val_loss": 2.5},
          {"event": "train", "step": 2, "tokens": 20, "loss": 2.0}]
    _job(tmp_path, "10", ["trainer.lr=1e-3", "seed=0"], [*ev, {"event": "done", "step": 2, "tokens": 20,
                                                               "val_loss": 2.7, "wall_s": 1.0}])
    _job(tmp_path, "2", ["trainer.lr=3e-3", "seed=0"], [*ev, {"event": "checkpoint", "step": 2},
                                                         {"event": "stopped", "step": 2, "signal": "SIGUSR1"}])
    _job(tmp_path, "3", ["trainer.lr=1e-2", "seed=0"], ev, tail='{"event": "train", "st')  # killed mid-write
    _job(tmp_path, "4", ["trainer.lr=3e-2", "seed=0"], [])
    jobs = find_jobs(tmp_path)
    assert [j.name for j in jobs] == ["2", "3", "4", "10"]
    states = {j.name: j.final()["state"] for j in jobs}
    assert states == {"2": "stopped (SIGUSR1)", "3": "unfinished", "4": "no metrics", "10": "done"}
    final = jobs[-1].final()
    assert final["val_loss"] == 2.7 and final["best_val_loss"] == 2.5 and final["train_loss"] == 2.0

    paths = sweep_report(tmp_path, tmp_path / "out")
    rows = list(csv.DictReader(paths["csv"].open()))
    assert list(rows[0])[:3] == ["job", "trainer.lr", "state"]  # seed=0 is shared, not a column
    assert [r["trainer.lr"] for r in rows] == ["3e-3", "1e-2", "3e-2", "1e-3"]
    md = paths["markdown"].read_text()
    assert "`seed=0`" in md and "swept: trainer.lr" in md
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)


def test_report_errors_name_the_directory(tmp_path, sapling_main):
    with pytest.raises(FileNotFoundError, match="no Hydra jobs"):
        sweep_report(tmp_path)
    for target, message in ((tmp_path / "missing", "is not a directory"), (tmp_path, "no Hydra jobs")):
        code, err = sapling_main("sweep-report", str(target))
        assert code == 1 and message in err and str(target) in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    code, err = sapling_main("sweep-report")
    assert code == 2 and "usage" in err
