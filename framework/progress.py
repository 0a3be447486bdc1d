"""Progress bars for the steps that take more than a few seconds (calibration, evaluation, search).

One tqdm bar on stderr, drawn by rank 0 only, updated at most every second on a terminal and every 30 s
when stderr is a file or a pipe (as the training bar does), so a log stays short. `trainer.progress=false`
turns them off: callers pass `enabled=cfg.trainer.progress`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return int(os.environ.get("RANK", "0") or 0)


def mininterval() -> float:
    """Seconds between redraws: 1 on a terminal, 30 in a log file (the training loop's bar uses the same)."""
    return 1.0 if sys.stderr.isatty() else 30.0


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str, unit: str = "it",
             enabled: bool = True, leave: bool = True) -> tqdm:
    """A tqdm bar over `iterable` (or updated by hand up to `total`); silent off rank 0 or when not `enabled`.

    In a log file every bar draws on line 0: a nested bar (validation inside the training bar) would otherwise
    move the cursor with terminal escapes (ESC[A) that a log cannot render."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled or _rank() != 0, leave=leave,
                file=sys.stderr, dynamic_ncols=True, mininterval=mininterval(),
                position=None if sys.stderr.isatty() else 0)
