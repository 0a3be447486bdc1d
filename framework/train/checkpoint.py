"""Resumable training checkpoints: `checkpoints/global_step{N}/` plus a `latest` file naming the newest.

The layout mirrors DeepSpeed's (tag directories + `latest`). Each checkpoint is written into a
temporary directory and renamed into place, and `latest` is replaced atomically afterwards, so a
process killed mid-save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str | os.PathLike, step: int, engine_state: dict, client_state: dict, keep_last: int) -> Path:
    """Write `root/global_step{step}` and point `root/latest` at it; keep the newest `keep_last` tags."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tag = f"global_step{step}"
    final = root / tag
    tmp = Path(tempfile.mkdtemp(prefix=f".{tag}.tmp-", dir=root))
    try:
        torch.save(engine_state, tmp / "engine.pt")
        torch.save({**client_state, "rng": rng_state()}, tmp / "client_state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / LATEST, tag)
    if keep_last > 0:
        tags = sorted((p for p in root.glob("global_step*") if p.is_dir()), key=lambda p: int(p.name[11:]))
        for old in tags[:-keep_last]:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(root: str | os.PathLike) -> tuple[dict, dict] | None:
    """(engine_state, client_state) of the checkpoint `latest` names, or None when there is none."""
    root = Path(root)
    latest = root / LATEST
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    path = root / tag
    if not (path / "client_state.pt").exists():
        raise FileNotFoundError(f"{latest} names {tag}, but {path} is incomplete; delete {latest} to start over")
    engine_state = torch.load(path / "engine.pt", map_location="cpu", weights_only=False)
    client_state = torch.load(path / "client_state.pt", map_location="cpu", weights_only=False)
    return engine_state, client_state
