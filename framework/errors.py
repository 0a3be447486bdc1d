"""The errors a user can cause, and the exit codes Sapling ends with. Imports nothing of Sapling.

Only subclasses of :class:`SaplingError` are printed as one line by the CLI (no traceback): they are
about the user's inputs (config values, data files, checkpoints, model sources, output directories,
the launch environment). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

# Exit codes (README "Exit codes"): 0 finished, 1 a user error found while running, 2 a config error
# found before any model loads, 3 stopped by a signal after a checkpoint (rerun the same command to
# resume), 130 a second Ctrl-C aborted without a checkpoint.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_STOPPED = 3
EXIT_ABORTED = 130

_ECHO_LIMIT = 120


def short(value: Any, limit: int = _ECHO_LIMIT) -> str:
    """`repr(value)` capped at `limit` characters, so an error never echoes a whole file or tensor."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}...({len(text):,} chars)"


class SaplingError(Exception):
    """A problem with the user's inputs; the CLI prints its message as one line and exits 1."""

    exit_code = EXIT_ERROR


class ConfigError(SaplingError, ValueError):
    """A bad config value. The message is one line: the key, what is wrong, and how to fix it."""

    exit_code = EXIT_CONFIG

    def __init__(self, key: str, value: Any, problem: str, fix: str) -> None:
        self.key = key
        super().__init__(f"{key}={short(value)}: {problem}; fix: {fix}")


class DataError(SaplingError, ValueError):
    """A data file that cannot be read as training text (binary, undecodable, empty, malformed)."""


class CheckpointError(SaplingError, ValueError):
    """A training checkpoint that is missing, truncated or does not match this run."""


class ModelSourceError(SaplingError, ValueError):
    """A model path that is not a loadable checkpoint (a file, no weights, truncated, offline hub id)."""


class OutputError(SaplingError, ValueError):
    """An output location that would overwrite or overlap something Sapling must not touch."""


class LaunchError(SaplingError, RuntimeError):
    """A distributed launch environment that cannot work (ranks, ports, a peer that failed)."""


class Stopped(Exception):
    """A stop signal (SIGTERM, SIGUSR1/2, Ctrl-C) ended the run at a safe point, after a checkpoint.

    Not a user error: the CLI exits EXIT_STOPPED and a rerun of the same command resumes. Raised where the
    stopped training result cannot simply be returned (a pipeline stage, the training inside a pre-hook);
    `result` is that TrainResult (`stopped=True`).
    """

    exit_code = EXIT_STOPPED

    def __init__(self, where: str, result: Any) -> None:
        super().__init__(f"stopped by a signal in {where}")
        self.where, self.result = where, result
