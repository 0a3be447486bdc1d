"""Metrics sinks: `metrics.jsonl` (always) and Weights & Biases (offline unless WANDB_MODE says otherwise)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends one JSON object per record to `output_dir/metrics.jsonl`; mirrors it to wandb when enabled."""

    def __init__(self, output_dir: str | os.PathLike, logger_cfg: Any = None, run_config: dict | None = None,
                 *, prefix: str = "", run_id: str | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - kept open for the run
        self._wandb = None
        if logger_cfg is not None and logger_cfg.name == "wandb":
            self._wandb = _init_wandb(Path(output_dir), logger_cfg, run_config or {}, run_id)

    @property
    def run_id(self) -> str | None:
        """The wandb run's id (stored in checkpoints, so a resumed run continues the same wandb run)."""
        return None if self._wandb is None else self._wandb.id

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **{k: _clean(v) for k, v in record.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            step = record.get("step")
            data = {f"{self.prefix}{record.get('event', 'log')}/{k}": v for k, v in record.items()
                    if isinstance(v, (int, float)) and k not in ("step", "time")}
            # A record without a step (prune, quantize, eval events) joins wandb's current step: wandb.log
            # without one would advance wandb's counter past the trainer's, and wandb would then drop the
            # following training steps with a "less than the current step" warning each.
            self._wandb.log(data, step=step if isinstance(step, int) else self._wandb.step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class NullMetrics:
    """The metrics sink of ranks other than 0 in a distributed run: records go nowhere."""

    path = None
    run_id = None

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _init_wandb(output_dir: Path, cfg: Any, run_config: dict, run_id: str | None = None):
    import wandb

    mode = cfg.mode or os.environ.get("WANDB_MODE") or "offline"
    # quiet: no version banner and no ~40-line history/summary panel at finish (the numbers are in
    # metrics.jsonl); where the run is and its URL are still printed. WANDB_QUIET / WANDB_SILENT decide if set.
    settings = None if {"WANDB_QUIET", "WANDB_SILENT"} & set(os.environ) else wandb.Settings(quiet=True)
    return wandb.init(project=cfg.project, name=cfg.run_name, mode=mode, dir=str(output_dir), config=run_config,
                      reinit="finish_previous", id=run_id, resume="allow" if run_id else None, settings=settings)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
