"""`sapling sweep-report <multirun dir>`: one table of a Hydra sweep's jobs and a plot of their curves.

A job is any directory under the given one holding Hydra's `.hydra/overrides.yaml` (so a sweep dir, a
command's `multirun/<command>` folder with several sweeps, or one job's dir all work). The table has
the overrides that differ between jobs as columns, then each job's state and final metrics; the
overrides all jobs share are listed above it. Written next to the jobs: sweep_report.md,
sweep_report.csv and sweep_val_loss.png.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sapling.errors import SaplingError
from sapling.eval.plots import plot_validation_curves, read_metrics
from sapling.eval.report import markdown_table
from sapling.io import write_text_atomically

METRIC_COLUMNS = ["state", "step", "tokens", "train_loss", "val_loss", "best_val_loss", "val_ppl", "tokens_per_s",
                  "wall_s"]


@dataclass
class Job:
    name: str  # path relative to the report's root
    path: Path
    overrides: dict[str, str]
    records: list[dict[str, Any]] = field(default_factory=list)

    def final(self) -> dict[str, Any]:
        train = [r for r in self.records if r.get("event") == "train"]
        evals = [r for r in self.records if r.get("event") in ("eval", "done") and "val_loss" in r]
        done = [r for r in self.records if r.get("event") == "done"]
        stopped = [r for r in self.records if r.get("event") == "stopped"]
        last_step = max((int(r.get("step", 0)) for r in self.records if "step" in r), default=0)
        if done:
            state = "done"
        elif stopped and stopped[-1].get("step", -1) >= last_step:
            state = f"stopped ({stopped[-1].get('signal', 'signal')})"
        elif self.records:
            state = "unfinished"
        else:
            state = "no metrics"
        out: dict[str, Any] = {"state": state, "step": last_step}
        if train:
            out.update(tokens=train[-1].get("tokens"), train_loss=train[-1].get("loss"),
                       tokens_per_s=train[-1].get("tokens_per_s"))
        if evals:
            out.update(val_loss=evals[-1]["val_loss"], val_ppl=evals[-1].get("val_ppl"),
                       best_val_loss=min(r["val_loss"] for r in evals))
        if done:
            out.update(tokens=done[-1].get("tokens", out.get("tokens")), wall_s=done[-1].get("wall_s"))
        return out


def _overrides(job_dir: Path) -> dict[str, str]:
    items = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
    out = {}
    for item in items or []:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out


def find_jobs(root: Path) -> list[Job]:
    """Every Hydra job under `root` (including `root` itself), in natural order (job 2 before job 10)."""
    dirs = [p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"]
    if (root / ".hydra" / "overrides.yaml").exists() and root not in dirs:
        dirs.append(root)

    def natural(p: Path) -> list[Any]:
        rel = p.relative_to(root).parts
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in rel]

    jobs = []
    for d in sorted(set(dirs), key=natural):
        metrics = d / "metrics.jsonl"
        jobs.append(Job(name=str(d.relative_to(root)) or ".", path=d, overrides=_overrides(d),
                        records=read_metrics(metrics) if metrics.exists() else []))
    return jobs


def _fmt(value: Any, column: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float) and column == "tokens_per_s":
        return f"{value:,.0f}"
    if isinstance(value, float) and column == "wall_s":
        return f"{value:.1f}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


class NotASweep(SaplingError, FileNotFoundError):
    """`sweep-report` was pointed at something that holds no Hydra sweep (the CLI prints it as one line)."""


def sweep_report(root: str | os.PathLike, output: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write the report files for the sweep under `root` (into `output`, default `root`); returns their paths."""
    root = Path(root)
    if not root.is_dir():
        raise NotASweep(f"sweep-report: {root} is not a directory; pass a Hydra multirun dir "
                                "(e.g. multirun/distill/2026-01-01_12-00-00)")
    jobs = find_jobs(root)
    if not jobs:
        raise NotASweep(f"sweep-report: no Hydra jobs under {root} (no */.hydra/overrides.yaml); pass the "
                                "sweep dir a `sapling <command> -m ...` run printed")
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    varying = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    shared = [f"{k}={jobs[0].overrides[k]}" for k in keys if k not in varying and k in jobs[0].overrides]
    finals = [j.final() for j in jobs]

    out_dir = Path(output) if output else root
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["job", *varying, *METRIC_COLUMNS]
    rows = [[j.name, *(j.overrides.get(k, "") for k in varying), *(f.get(c) for c in METRIC_COLUMNS)]
            for j, f in zip(jobs, finals)]

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*columns, "overrides"])
    for j, row in zip(jobs, rows):
        writer.writerow([*("" if v is None else v for v in row), " ".join(f"{k}={v}" for k, v in j.overrides.items())])
    csv_path = write_text_atomically(out_dir / "sweep_report.csv", buf.getvalue())

    label_keys = varying or ["job"]
    runs = {(" ".join(f"{k}={j.overrides.get(k, '')}" for k in varying) if varying else j.name): j.records
            for j in jobs}
    png_path = plot_validation_curves(runs, out_dir / "sweep_val_loss.png",
                                      title=f"validation loss by {', '.join(label_keys)} ({root.name})")

    md = [f"# Sweep report: {root}", "", f"{len(jobs)} job(s); swept: {', '.join(varying) or '(nothing varies)'}", ""]
    if shared:
        md += ["Shared overrides: " + " ".join(f"`{s}`" for s in shared), ""]
    md += [markdown_table(columns, [[_fmt(v, c) for v, c in zip(row, columns)] for row in rows]), "",
           f"![validation loss]({os.path.relpath(png_path, out_dir)})", ""]
    md_path = write_text_atomically(out_dir / "sweep_report.md", "\n".join(md))
    return {"markdown": md_path, "csv": csv_path, "png": png_path}

