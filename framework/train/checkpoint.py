"""Resumable training checkpoints: `checkpoints/global_step{N}/` plus a `latest` file naming the newest.

The layout is DeepSpeed's (tag directories + `latest`), and with `deepspeed=zero*` a tag directory holds
DeepSpeed's own files (`mp_rank_00_model_states.pt`, `zero_pp_rank_*_optim_states.pt`, ...), so
`zero_to_fp32` and `ds_to_universal` work on it. Beside them Sapling writes `sapling_state.pt` (step,
tokens seen, loader position, data fingerprint, wandb run id, world size), `rng/rank{r}.pt` (each rank's
RNG states) and `hf/` (the student's HF config and tokenizer, for `sapling export`).

Crash safety: every rank writes into a hidden `.tmp-global_step{N}` directory; after a barrier rank 0
renames it to `global_step{N}` and then replaces `latest` atomically. A process killed at any point leaves
`latest` naming a complete checkpoint. Only the newest `keep_last` tags are kept.

A checkpoint written at another world size or ZeRO stage is converted once with DeepSpeed's
`ds_to_universal` (into `checkpoints/universal/global_step{N}`) and loaded as a universal checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapling.dist import barrier, broadcast_object, rank_world

LATEST = "latest"
STATE_FILE = "sapling_state.pt"
UNIVERSAL_DIR = "universal"
TAG_PREFIX = "global_step"
# Test-only fault injection: stall inside the save of this step (after the files are written, before the
# commit), so a test can SIGKILL the run mid-save.
FAULT_STALL_ENV = "SAPLING_FAULT_STALL_IN_SAVE"


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


def _torch_save_atomic(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _step_of(tag_dir: Path) -> int:
    return int(tag_dir.name[len(TAG_PREFIX):])


def checkpoint_tags(root: str | os.PathLike) -> list[Path]:
    """Committed tag directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p for p in root.glob(f"{TAG_PREFIX}*") if p.is_dir() and p.name[len(TAG_PREFIX):].isdigit()]
    return sorted(tags, key=_step_of)


def latest_tag(root: str | os.PathLike) -> Path | None:
    """The tag directory `root/latest` names, or None when there is no checkpoint yet."""
    root = Path(root)
    latest = root / LATEST
    if not latest.exists():
        return None
    path = root / latest.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{latest} names {path.name}, but {path} is incomplete; delete {latest} to start "
                                "over (or point it at an older global_step directory)")
    return path


def read_state(tag_dir: str | os.PathLike) -> dict[str, Any]:
    """Sapling's client state of a checkpoint (step, tokens, loader, data fingerprint, world size, ...)."""
    return torch.load(Path(tag_dir) / STATE_FILE, map_location="cpu", weights_only=False)


def _stall_if_asked(step: int, tmp: Path) -> None:
    if os.environ.get(FAULT_STALL_ENV) == str(step):
        parent = os.getppid()
        (tmp.parent / f".stalled-{step}-rank{rank_world()[0]}").touch()
        while os.getppid() == parent:  # until killed; a rank orphaned by its killed launcher dies too
            time.sleep(0.5)
        os._exit(1)


def save_checkpoint(root: str | os.PathLike, step: int, engine: Any, client_state: dict, keep_last: int, *,
                    model: torch.nn.Module | None = None, tokenizer: Any = None) -> Path:
    """Write `root/global_step{step}` (all ranks call this), point `root/latest` at it, keep `keep_last` tags.

    `engine` writes its own files (`engine.save_checkpoint(dir)`); `model`/`tokenizer` give the HF config
    and tokenizer stored beside them for `sapling export`.
    """
    root = Path(root)
    rank, world = rank_world()
    tag = f"{TAG_PREFIX}{step}"
    final, tmp = root / tag, root / f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        (tmp / "rng").mkdir()
    barrier()
    engine.save_checkpoint(tmp)
    torch.save(rng_state(), tmp / "rng" / f"rank{rank}.pt")
    if rank == 0:
        if model is not None:
            model.config.save_pretrained(tmp / "hf")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "hf")
        _torch_save_atomic({**client_state, "step": step, "world_size": world, "engine": engine.kind,
                            "zero_stage": getattr(engine, "stage", 0)}, tmp / STATE_FILE)
    _stall_if_asked(step, tmp)
    barrier()
    if rank == 0:
        if final.exists():  # committed earlier but never named by `latest` (killed between the two)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST, tag)
        if keep_last > 0:
            for old in checkpoint_tags(root)[:-keep_last]:
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
                    shutil.rmtree(root / UNIVERSAL_DIR / old.name, ignore_errors=True)
    barrier()
    return final


def needs_universal(state: dict[str, Any], engine_kind: str, zero_stage: int) -> bool:
    """True when a DeepSpeed checkpoint was written at another world size or ZeRO stage than this run's."""
    if engine_kind != state.get("engine", "local"):
        raise ValueError(f"the checkpoint was written by a {state.get('engine', 'local')} engine, this run uses a "
                         f"{engine_kind} one; resume with the deepspeed= setting it was written with, or export "
                         "it (`sapling export checkpoint=...`) and start a new output_dir from the exported model")
    return engine_kind == "deepspeed" and (state["world_size"] != rank_world()[1]
                                           or state.get("zero_stage") != zero_stage)


def universal_checkpoint(tag_dir: str | os.PathLike) -> Path:
    """`ds_to_universal` of `tag_dir` into `<root>/universal/<tag>` (rank 0 converts once; all ranks call)."""
    tag_dir = Path(tag_dir)
    out = tag_dir.parent / UNIVERSAL_DIR / tag_dir.name
    if rank_world()[0] == 0 and not out.exists():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".tmp-{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints per-parameter progress
            ds_to_universal(args)
        os.replace(tmp, out)
    error = broadcast_object(None if out.exists() or rank_world()[0] != 0 else "conversion failed")
    if error:
        raise RuntimeError(f"ds_to_universal of {tag_dir}: {error}")
    barrier()
    return out


def load_checkpoint(tag_dir: str | os.PathLike, engine: Any, *, universal: bool = False) -> dict[str, Any]:
    """Load `tag_dir` into `engine` (all ranks call), restore this rank's RNG; returns Sapling's client state."""
    tag_dir = Path(tag_dir)
    state = read_state(tag_dir)
    engine.load_checkpoint(universal_checkpoint(tag_dir) if universal else tag_dir)
    rng = tag_dir / "rng" / f"rank{rank_world()[0]}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    return state
