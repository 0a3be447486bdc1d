"""Output safety: the one place that decides whether a command may write into a directory, and the
atomic writers every output goes through (`write_atomically`, `write_bytes_atomically`,
`write_text_atomically`, `write_dir_atomically`: a unique temp name beside the target, then a rename).

The rules (README "What Sapling refuses and why"):

- An output never equals, contains or lies inside one of the command's inputs (a model, a checkpoint, a
  data file, a teacher cache), and never lies inside a training `checkpoints/` folder.
- A command writes only into a directory that is new, empty (Hydra's own `.hydra/` and log file aside),
  or that Sapling made for the same command earlier: `.sapling-run.json` in it records which command
  made it, and whether that run finished. Anything else is refused with one line, before any model loads.
- A training run is resumed only by the command that made it; `trainer.resume=false` over an earlier
  run is refused unless `trainer.overwrite=true`, which moves the earlier run's files aside into
  `replaced-<time>/` (nothing is deleted).

Imports nothing of Sapling but `errors`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from sapling.errors import OutputError

RUN_FILE = ".sapling-run.json"
Buffer = bytes | bytearray | memoryview
# What Hydra writes into its run dir before Sapling starts: not a user's files.
_HYDRA_ENTRIES = (".hydra",)


def _resolve(path: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def read_run(out: str | os.PathLike) -> dict[str, Any] | None:
    """The `.sapling-run.json` record of `out`, or None when Sapling did not make it."""
    path = Path(out) / RUN_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_run(out: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Create or update `out/.sapling-run.json` (atomically) with `fields`."""
    record = {**(read_run(out) or {}), **fields}
    write_text_atomically(Path(out) / RUN_FILE, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def _temp_name(path: Path, kind: str = "tmp") -> Path:
    """A hidden name beside `path` no other writer uses: `.<name>.<kind>-<random>`."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}")


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object], *,
                     fsync: bool = True) -> Path:
    """`write(f)` fills a unique temp file beside `path` (opened "wb"), which then replaces `path`.

    On any error (or a signal's exception) the temp file is removed and `path` is left as it was; a process
    killed outright leaves at most a hidden `.<name>.tmp-*` file, never a partial `path`. The mode follows
    the umask, as for open(); `fsync` flushes the data to disk before the rename (checkpoints, caches).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        publish(tmp)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomically(path: str | os.PathLike, data: Buffer | Iterable[Buffer], *,
                           fsync: bool = True) -> Path:
    """:func:`write_atomically` of `data`: one bytes-like object or several written one after another."""
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data

    def write(f: BinaryIO) -> None:
        for chunk in chunks:
            f.write(chunk)

    return write_atomically(path, write, fsync=fsync)


def write_text_atomically(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """:func:`write_atomically` of `text` (UTF-8)."""
    return write_bytes_atomically(path, text.encode("utf-8"), fsync=fsync)


def write_dir_atomically(out: str | os.PathLike, build: Callable[[Path], object], *,
                         keep_existing: bool = False) -> Path:
    """`build(tmp)` fills a unique temp dir beside `out`, which then replaces `out` (an old `out` is moved
    aside first and removed only after the rename); on any error the temp dir is removed and `out` is left
    as it was. Modes follow the umask (mkdtemp's 0700 and safetensors' 0600 are undone by :func:`publish`).

    `keep_existing`: for caches keyed by content, an `out` that another process finished meanwhile is kept
    (ours is dropped), so a reader of it never sees it replaced.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        publish(tmp)
        if keep_existing:
            try:
                os.rename(tmp, out)  # fails on a non-empty `out`: someone else's finished copy
            except OSError:
                if not out.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        elif out.exists():
            old = _temp_name(out, "old")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(path: str | os.PathLike) -> Path:
    """Give `path` (a file, or a directory and all in it) the modes plain open()/mkdir() give under the umask.

    Temp-name writers make private files: mkdtemp 0700, mkstemp and safetensors 0600. Call this on the temp
    name before the rename, so an export or cache is as readable as anything else the user writes.
    Symbolic links are left alone (never a chmod outside the tree).
    """
    path = Path(path)
    mask = current_umask()
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                p = os.path.join(root, name)
                if not os.path.islink(p):
                    os.chmod(p, (0o777 if name in dirs else 0o666) & ~mask)
        os.chmod(path, 0o777 & ~mask)
    elif not path.is_symlink():
        os.chmod(path, 0o666 & ~mask)
    return path


def user_entries(out: Path, hydra_log: str | None = None) -> list[str]:
    """Entries of `out` that are neither Hydra's (`.hydra/`, the job's log) nor Sapling's run record."""
    if not out.is_dir():
        return []
    skip = {*_HYDRA_ENTRIES, RUN_FILE}
    return sorted(p.name for p in out.iterdir()
                  if p.name not in skip and not (p.suffix == ".log" and p.name.startswith(hydra_log or "sapling-")))


def inside_checkpoints(path: Path) -> Path | None:
    """The training `checkpoints/` folder `path` is (or lies inside), if any."""
    for p in (path, *path.parents):
        if p.is_dir() and ((p / "latest").is_file() or any((q / "sapling_state.pt").is_file()
                                                           for q in p.glob("global_step*"))):
            return p  # DeepSpeed's layout (Sapling's state beside it), whatever the folder is called
    return None


def check_output(key: str, out: str | os.PathLike, *, command: str,
                 inputs: Iterable[tuple[str, str | os.PathLike | None]] = (), fresh_only: bool = False) -> Path:
    """Refuse (OutputError, one line) an output location that would destroy or overlap something.

    `inputs`: (key, path) of everything the command reads. `fresh_only`: the directory must be new or
    empty even if an earlier run of the same command made it (`sapling export` without a run record).
    Returns the resolved path; nothing is created.
    """
    path = _resolve(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{key}={out}: is a file, not a directory; fix: choose a directory path for {key}")
    for in_key, src in inputs:
        if src is None:
            continue
        src_path = _resolve(src)
        if _overlaps(path, src_path):
            how = "is" if path == src_path else ("contains" if path in src_path.parents else "lies inside")
            raise OutputError(f"{key}={out}: {how} the input {in_key}={src}, which would be overwritten; fix: "
                              f"choose another {key} outside it (e.g. {_beside(src_path, command)})")
    ckpt = inside_checkpoints(path)
    if ckpt is not None:
        raise OutputError(f"{key}={out}: lies inside the training checkpoints folder {ckpt}, which only the "
                          f"trainer writes; fix: choose another {key} outside it (e.g. {ckpt.parent / command})")
    entries = user_entries(path)
    if entries:
        run = read_run(path)
        made_by = run.get("command") if run else _legacy_command(path)
        if fresh_only or made_by != command:
            what = f"a `sapling {made_by}` run" if made_by else f"files Sapling did not write ({_list(entries)})"
            raise OutputError(f"{key}={out}: already holds {what}; Sapling never replaces a directory it did not "
                              f"make for this output; fix: choose a new {key} (e.g. {_beside(path, command)})")
    parent = next((p for p in (path, *path.parents) if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{key}={out}: {parent} is not writable by this user; fix: choose a writable {key}")
    return path


def claim_output(key: str, out: str | os.PathLike, *, command: str,
                 inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> Path:
    """:func:`check_output`, then make the directory and record that `command` made it."""
    path = check_output(key, out, command=command, inputs=inputs)
    path.mkdir(parents=True, exist_ok=True)
    if read_run(path) is None:
        write_run(path, command=command, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return path


def move_aside(out: str | os.PathLike, keep: Iterable[str] = ()) -> Path | None:
    """Move every entry of `out` except Hydra's, the run record and `keep` into `out/replaced-<time>/`."""
    out = Path(out)
    entries = [e for e in user_entries(out) if e not in set(keep) and not e.startswith("replaced-")]
    if not entries:
        return None
    dest = out / time.strftime("replaced-%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = out / f"{dest.name.split('.')[0]}.{n}"
        n += 1
    dest.mkdir()
    for name in entries:
        os.replace(out / name, dest / name)
    return dest


def _legacy_command(path: Path) -> str | None:
    """The command of a run dir written before run records existed (its config.yaml's `command:` line)."""
    try:
        for line in (path / "config.yaml").read_text().splitlines():
            if line.startswith("command:"):
                return line.split(":", 1)[1].strip().strip("'\"")
    except OSError:
        pass
    return None


def _beside(path: Path, command: str) -> str:
    return str(path.parent / f"{path.name}-{command}")


def _list(entries: list[str], limit: int = 4) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f", ... {len(entries) - limit} more" if len(entries) > limit else "")
