"""Loss curves from metrics.jsonl files, drawn to PNG with matplotlib's file-only (Agg) backend."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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


def plot_validation_curves(curves: dict[str, tuple[list[float], list[float]]], path: str | os.PathLike,
                           xlabel: str = "training tokens", title: str = "validation loss") -> Path:
    """One line per run (label -> (x, loss)) in a PNG at `path` (written to a temp name, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, (xs, ys) in curves.items():
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if any(xs for xs, _ in curves.values()):
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
