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

import contextlib
import io
import json
import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapling import faults
from sapling.dist import barrier, broadcast_object, rank_world
from sapling.errors import CheckpointError, SaplingError
from sapling.io import write_atomically, write_dir_atomically, write_text_atomically

LATEST = "latest"
STATE_FILE = "sapling_state.pt"
UNIVERSAL_DIR = "universal"
TAG_PREFIX = "global_step"


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


def _step_of(tag_dir: Path) -> int:
    return int(tag_dir.name[len(TAG_PREFIX):])


def checkpoint_tags(root: str | os.PathLike) -> list[Path]:
    """Committed tag directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p for p in root.glob(f"{TAG_PREFIX}*") if p.is_dir() and p.name[len(TAG_PREFIX):].isdigit()]
    return sorted(tags, key=_step_of)


def latest_tag(root: str | os.PathLike, purpose: str = "resume") -> Path | None:
    """The tag directory `root/latest` names, or None when there is no checkpoint yet.

    A `latest` naming a missing or incomplete directory is a CheckpointError that names the previous complete
    checkpoint to use instead (`purpose`: "resume" or "export", for the fix it suggests).
    """
    root = Path(root)
    latest = root / LATEST
    if not latest.exists():
        return None
    name = latest.read_text(errors="replace").strip()
    path = root / name
    if not name.startswith(TAG_PREFIX) or not path.is_dir():
        raise CheckpointError(f"{latest} names {name[:40]!r}, which is not a checkpoint directory in {root}; "
                              f"{checkpoint_fix(path, purpose)}")
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"{latest} names {name}, but {path} is incomplete (no {STATE_FILE}); "
                              f"{checkpoint_fix(path, purpose)}")
    return path


def previous_tag(tag_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint older than `tag_dir` in the same folder, or None."""
    tag_dir = Path(tag_dir)
    step = _step_of(tag_dir) if tag_dir.name[len(TAG_PREFIX):].isdigit() else None
    older = [t for t in checkpoint_tags(tag_dir.parent)
             if t != tag_dir and (step is None or _step_of(t) < step) and (t / STATE_FILE).exists()]
    return older[-1] if older else None


def checkpoint_fix(tag_dir: str | os.PathLike, purpose: str = "resume") -> str:
    """What to do about an unusable checkpoint `tag_dir`: the previous complete one to use, or start over."""
    tag_dir = Path(tag_dir)
    prev = previous_tag(tag_dir)
    if purpose == "export":
        return (f"fix: export the previous checkpoint, checkpoint={prev}" if prev is not None
                else "fix: no earlier complete checkpoint is kept in that folder; export another run's")
    start_over = "start over with trainer.overwrite=true (moves this run aside) or a new output_dir"
    if prev is None:
        return f"fix: no earlier complete checkpoint is kept; {start_over}"
    return (f"fix: resume from the previous one, {prev.name}, by writing its name into {tag_dir.parent / LATEST} "
            f"(`echo {prev.name} > {tag_dir.parent / LATEST}`), or {start_over}")


def _reason(err: BaseException) -> str:
    """The first line of an exception, capped (a torch/pickle error can quote whole byte strings)."""
    text = (str(err).strip().splitlines() or [""])[0]
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= 160 else text[:150] + "..."


def load_checkpoint_file(path: str | os.PathLike, what: str, purpose: str = "resume") -> Any:
    """`torch.load` of one file of a checkpoint (`path` inside its tag directory, `what` it holds); a missing,
    truncated or corrupt file is a CheckpointError naming the file, the step and what to do instead."""
    path = Path(path)
    tag_dir = next((p for p in path.parents if p.name.startswith(TAG_PREFIX)), path.parent)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: checkpoint {tag_dir.name} has no {what}; "
                              f"{checkpoint_fix(tag_dir, purpose)}") from None
    except Exception as err:  # noqa: BLE001  (torch.load fails on a damaged file in many ways: zip, pickle, EOF)
        raise CheckpointError(f"cannot read {path} ({what} of checkpoint {tag_dir.name}): the file is truncated or "
                              f"corrupt ({_reason(err)}); {checkpoint_fix(tag_dir, purpose)}") from err


def damaged_files(tag_dir: str | os.PathLike) -> list[str]:
    """The `*.pt` files under `tag_dir` whose zip container (torch.save's format) is truncated or corrupt, relative
    to it. Reads only each file's central directory, so it is cheap whatever the checkpoint's size."""
    tag_dir, bad = Path(tag_dir), []
    for path in sorted(tag_dir.rglob("*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError):
            bad.append(str(path.relative_to(tag_dir)))
    return bad


def read_state(tag_dir: str | os.PathLike, purpose: str = "resume") -> dict[str, Any]:
    """Sapling's client state of a checkpoint (step, tokens, loader, data fingerprint, world size, ...)."""
    state = load_checkpoint_file(Path(tag_dir) / STATE_FILE, "Sapling's training state", purpose)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{Path(tag_dir) / STATE_FILE} is not a Sapling training state (no step recorded); "
                              f"{checkpoint_fix(tag_dir, purpose)}")
    return state


# HF config fields that fix a student's parameter shapes; a checkpoint only loads into the same values.
SHAPE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")


def check_same_shape(tag_dir: str | os.PathLike, config: Any) -> None:
    """Refuse to resume `tag_dir` into a student whose HF `config` has another shape than the one it was saved
    with (e.g. a rerun with other `student.config.*` into the same output_dir)."""
    saved = Path(tag_dir) / "hf" / "config.json"
    if config is None or not saved.exists():
        return
    try:
        recorded = json.loads(saved.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {saved} (the model config of checkpoint {Path(tag_dir).name}): "
                              f"{_reason(err)}; {checkpoint_fix(tag_dir)}") from err
    diff = [f"{k}={recorded[k]!r} (this run: {getattr(config, k)!r})" for k in SHAPE_FIELDS
            if recorded.get(k) is not None and getattr(config, k, None) is not None and recorded[k] != getattr(config, k)]
    if diff:
        raise CheckpointError(f"checkpoint {tag_dir} holds a student of another shape: {', '.join(diff)}; fix: rerun "
                              "with the settings it was written with to resume it, or train the new shape in a new "
                              "output_dir (or with trainer.overwrite=true, which moves this run aside)")


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
        state = {**client_state, "step": step, "world_size": world, "engine": engine.kind,
                 "zero_stage": getattr(engine, "stage", 0)}
        write_atomically(tmp / STATE_FILE, lambda f: torch.save(state, f))
    faults.in_save(step, tmp, rank)  # test-only seam: files written, not yet committed
    barrier()
    if rank == 0:
        if final.exists():  # committed earlier but never named by `latest` (killed between the two)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomically(root / LATEST, tag)
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
        raise CheckpointError(f"the checkpoint was written by a {state.get('engine', 'local')} engine, this run uses a "
                              f"{engine_kind} one; fix: resume with the deepspeed= setting it was written with, or "
                              "export it (`sapling export checkpoint=...`) and start a new output_dir from the "
                              "exported model")
    return engine_kind == "deepspeed" and (state["world_size"] != rank_world()[1]
                                           or state.get("zero_stage") != zero_stage)


def universal_checkpoint(tag_dir: str | os.PathLike) -> Path:
    """`ds_to_universal` of `tag_dir` into `<root>/universal/<tag>` (rank 0 converts once; all ranks call)."""
    tag_dir = Path(tag_dir)
    out = tag_dir.parent / UNIVERSAL_DIR / tag_dir.name
    if rank_world()[0] == 0 and not out.exists():
        from sapling.train.ds_compat import to_universal

        def convert(tmp: Path) -> None:
            with contextlib.redirect_stdout(io.StringIO()):  # the converter prints per-parameter progress
                to_universal(tag_dir, tmp)

        write_dir_atomically(out, convert)
    error = broadcast_object(None if out.exists() or rank_world()[0] != 0 else "conversion failed")
    if error:
        raise CheckpointError(f"DeepSpeed's ds_to_universal could not convert {tag_dir} ({error}); "
                              f"{checkpoint_fix(tag_dir)}")
    barrier()
    return out


def load_checkpoint(tag_dir: str | os.PathLike, engine: Any, *, universal: bool = False) -> dict[str, Any]:
    """Load `tag_dir` into `engine` (all ranks call), restore this rank's RNG; returns Sapling's client state."""
    tag_dir = Path(tag_dir)
    state = read_state(tag_dir)
    check_same_shape(tag_dir, getattr(getattr(engine.module, "model", engine.module), "config", None))
    source = universal_checkpoint(tag_dir) if universal else tag_dir
    try:
        engine.load_checkpoint(source)
    except SaplingError:
        raise
    except Exception as err:  # noqa: BLE001  (torch.load/DeepSpeed fail on a damaged or foreign file in many ways)
        if isinstance(err, torch.OutOfMemoryError | MemoryError):
            raise
        bad = damaged_files(source)
        what = (f"{source / bad[0]} (checkpoint {tag_dir.name}) is truncated or corrupt" if bad else
                f"cannot load checkpoint {source} into this run: its files are damaged or were written for another "
                "model or optimizer")
        raise CheckpointError(f"{what} ({_reason(err)}); {checkpoint_fix(tag_dir)}") from err
    rng = tag_dir / "rng" / f"rank{rank_world()[0]}.pt"
    if rng.exists():
        set_rng_state(load_checkpoint_file(rng, "RNG state"))
    return state
