"""Test-only fault injection: named seams the hot paths call, no-ops unless a test installs one.

The training loop, the checkpoint writer, the teacher-cache writer and the process-group set-up each call
one seam at the point where a test needs a fault (a signal after a step, a stall inside a save, a kill
after some shards, a failing rank). In production every seam is a no-op. Subprocess tests ask for faults
through `SAPLING_FAULT_*` variables, which `from_env` reads once per CLI run; in-process tests monkeypatch
the seams (`monkeypatch.setattr(faults, "after_step", ...)`). Imports nothing of Sapling but its errors.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from sapling.errors import LaunchError

# Rank 0 raises signals after an optimizer step: `N` (any loop) or `DESC:N` (only the loop with that `desc`,
# a pipeline stage such as `distill:3`); FAULT_SIGNAL_NAME_ENV: the signals, in turn, e.g. `INT` or `INT,INT`
# (default USR1).
FAULT_SIGNAL_ENV = "SAPLING_FAULT_SIGNAL_AT_STEP"
FAULT_SIGNAL_NAME_ENV = "SAPLING_FAULT_SIGNAL"
# Every rank stalls inside the save of this step (after its files are written, before the commit) until
# its parent dies, so a test can SIGKILL the run mid-save.
FAULT_STALL_ENV = "SAPLING_FAULT_STALL_IN_SAVE"
# The teacher-cache writer kills itself (SIGKILL) after writing this many shards.
FAULT_KILL_ENV = "SAPLING_FAULT_KILL_AFTER_SHARDS"
# The rank named here fails with a LaunchError right after joining the process group, while the others go
# on into their first collective (a rank that meets a user error early).
FAULT_FAIL_RANK_ENV = "SAPLING_FAULT_FAIL_RANK"


def _noop(*_args: object) -> None:
    return None


# The seams (called as `faults.<name>(...)`, so a replacement here reaches every caller).
after_step: Callable[[int, str], None] = _noop  # (optimizer steps done, the loop's desc), rank 0 only
in_save: Callable[[int, Path, int], None] = _noop  # (step, the hidden tag dir being written, rank)
after_shard: Callable[[int], None] = _noop  # (shards this rank has written)
after_join: Callable[[int], None] = _noop  # (this rank, just joined the process group)

_SEAMS = ("after_step", "in_save", "after_shard", "after_join")


def signal_after_step(at: str, names: str = "USR1") -> Callable[[int, str], None]:
    """An `after_step` raising the signals `names` (comma-separated, e.g. `INT,INT`) after step `at` (`N` or
    `DESC:N`); each handler runs before `raise_signal` returns."""
    where, _, step = at.rpartition(":")
    target = int(step or 0)

    def seam(done: int, desc: str) -> None:
        if target and done == target and where in ("", desc):
            for name in names.split(","):
                signal.raise_signal(signal.Signals["SIG" + name])

    return seam


def stall_in_save(at: int) -> Callable[[int, Path, int], None]:
    """An `in_save` that stalls the save of step `at` until the process's parent dies (then exits 1)."""

    def seam(step: int, tmp: Path, rank: int) -> None:
        if step == at:
            parent = os.getppid()
            (Path(tmp).parent / f".stalled-{step}-rank{rank}").touch()
            while os.getppid() == parent:  # until killed; a rank orphaned by its killed launcher dies too
                time.sleep(0.5)
            os._exit(1)

    return seam


def kill_after_shards(count: int) -> Callable[[int], None]:
    """An `after_shard` that SIGKILLs this process once it has written `count` shards."""

    def seam(written: int) -> None:
        if count and written >= count:
            os.kill(os.getpid(), signal.SIGKILL)

    return seam


def fail_rank(which: int) -> Callable[[int], None]:
    """An `after_join` under which rank `which` fails with a LaunchError."""

    def seam(rank: int) -> None:
        if rank == which:
            raise LaunchError(f"rank {rank} failed on purpose ({FAULT_FAIL_RANK_ENV} is set: a test hook)")

    return seam


def seams_from_env(env: Mapping[str, str]) -> dict[str, Callable]:
    """The seams the `SAPLING_FAULT_*` variables in `env` ask for (unset or empty ones: none)."""
    seams: dict[str, Callable] = {}
    if env.get(FAULT_SIGNAL_ENV):
        seams["after_step"] = signal_after_step(env[FAULT_SIGNAL_ENV], env.get(FAULT_SIGNAL_NAME_ENV) or "USR1")
    if env.get(FAULT_STALL_ENV):
        seams["in_save"] = stall_in_save(int(env[FAULT_STALL_ENV]))
    if env.get(FAULT_KILL_ENV):
        seams["after_shard"] = kill_after_shards(int(env[FAULT_KILL_ENV]))
    if env.get(FAULT_FAIL_RANK_ENV):
        seams["after_join"] = fail_rank(int(env[FAULT_FAIL_RANK_ENV]))
    return seams


@contextlib.contextmanager
def from_env(env: Mapping[str, str] | None = None) -> Iterator[None]:
    """Install the seams the `SAPLING_FAULT_*` variables ask for (the CLI, once per run); restore on exit, so
    an in-process run leaves no fault behind. Seams without a variable keep what they are (a test's patch)."""
    wanted = seams_from_env(os.environ if env is None else env)
    saved = {name: globals()[name] for name in _SEAMS}
    globals().update(wanted)
    try:
        yield
    finally:
        globals().update(saved)
