"""Loss curves from metrics.jsonl files, drawn to PNG with matplotlib's file-only (Agg) backend."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sapling.io import write_atomically


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a half-written last line (a run killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def validation_curve(records: list[dict[str, Any]], x: str = "tokens") -> tuple[list[float], list[float]]:
    """(x, validation loss) of every `eval`/`done` record that has both, in order, one point per x."""
    points: dict[float, float] = {}
    for r in records:
        if r.get("event") in ("eval", "done") and "val_loss" in r and x in r:
            points[float(r[x])] = float(r["val_loss"])
    xs = sorted(points)
    return xs, [points[v] for v in xs]


def plot_validation_curves(runs: dict[str, list[dict[str, Any]]], path: str | os.PathLike,
                           title: str = "validation loss") -> Path:
    """One PNG of each run's validation loss (label -> its metrics records) against training tokens and,
    when the records carry them, against training FLOPs (the whole step's: the student's training plus the
    online teacher's forward). Written to a temp name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_x = [("tokens", "training tokens")]
    if any(validation_curve(records, "flops")[0] for records in runs.values()):
        axes_x.append(("flops", "training FLOPs (student + teacher forward)"))
    fig, axes = plt.subplots(1, len(axes_x), figsize=(6.5 * len(axes_x), 4.5), dpi=120, squeeze=False)
    for ax, (key, label) in zip(axes[0], axes_x):
        drawn = False
        for name, records in runs.items():
            xs, ys = validation_curve(records, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, label=name)
                drawn = True
        if key == "flops":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return write_atomically(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
