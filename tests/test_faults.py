"""Test-only fault injection: seams that are no-ops unless installed, from SAPLING_FAULT_* once per CLI run or
by a test's monkeypatch; nothing of them is read in the hot paths."""

from __future__ import annotations

import signal

import pytest

from sapling import faults
from sapling.errors import LaunchError


def test_seams_are_no_ops_until_installed():
    assert all(getattr(faults, name) is faults._noop for name in faults._SEAMS)


def test_env_installs_the_seams_for_one_run_and_restores_them(monkeypatch):
    seen = []
    monkeypatch.setattr(faults, "in_save", lambda *a: seen.append(a))  # a test's own seam is kept
    monkeypatch.setenv(faults.FAULT_FAIL_RANK_ENV, "1")
    with faults.from_env():
        faults.after_join(0)
        with pytest.raises(LaunchError, match="rank 1 failed on purpose"):
            faults.after_join(1)
        faults.in_save(3, None, 0)
    faults.after_join(1)  # restored: a no-op again
    assert seen == [(3, None, 0)]


def test_signal_seam_fires_after_its_step_in_its_loop_only():
    raised = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, _frame: raised.append(signum))
    try:
        seam = faults.seams_from_env({faults.FAULT_SIGNAL_ENV: "distill:2",
                                      faults.FAULT_SIGNAL_NAME_ENV: "USR2,USR2"})["after_step"]
        seam(2, "train")
        seam(1, "distill")
        assert raised == []
        seam(2, "distill")
        assert raised == [signal.SIGUSR2, signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert faults.seams_from_env({faults.FAULT_STALL_ENV: ""}) == {}
