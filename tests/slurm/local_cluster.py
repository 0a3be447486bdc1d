"""A one-machine Slurm cluster for tests: munged, slurmctld and slurmd on localhost.

Debian's packages (`slurmctld slurmd slurm-client munge`) are installed with apt-get when missing;
every daemon this module starts is stopped by `LocalSlurm.stop()`, and its state lives in one
temporary directory, so nothing is left behind on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


def ensure_packages() -> None:
    """apt-get install the Slurm and munge packages when their binaries are missing (needs root)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"the slurm tests need Debian's {' '.join(PACKAGES)} and root to install them; "
                           "install them or deselect the tests with -m 'not slurm'")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    # without the recommended extras (dozens of plugins, HDF5, ROCm SMI, -dev packages): the basic plugins
    # hold everything SLURM_CONF uses (auth/cred munge, select/cons_tres, proctrack/linuxproc, jobcomp/filetxt)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   capture_output=True)


def _node_line() -> str:
    """This machine as slurmd sees it (`slurmd -C`), minus the uptime line."""
    out = subprocess.run(["slurmd", "-C"], check=True, capture_output=True, text=True).stdout
    name, _, rest = out.splitlines()[0].partition(" ")
    return f"{name} NodeAddr=127.0.0.1 {rest}"  # loopback, whatever the host name resolves to


SLURM_CONF = """\
ClusterName=sapling-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
# A requeued job waits for its old credential to expire before it may start again (default 120 s).
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={state}/jobcomp.log
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=60
SchedulerParameters=defer_batch
{node} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def is_running(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped by its parent, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """Start with `LocalSlurm(tmp).start()`; `env` holds SLURM_CONF for sbatch/squeue/scontrol."""

    def __init__(self, state_dir: Path) -> None:
        self.state = Path(state_dir)
        self.conf = self.state / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []
        self._munged_started = False

    def start(self, timeout: float = 60.0) -> LocalSlurm:
        ensure_packages()
        for sub in ("ctld", "spool"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(SLURM_CONF.format(host=host, state=self.state, node=_node_line(),
                                               ctld_port=_free_port(), slurmd_port=_free_port()))
        self._start_munge()
        # -D: stay in the foreground, so these Popen objects are the daemons themselves.
        self._procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        self._procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(self.conf)], env=self.env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if out in ("idle", "mixed", "allocated"):
                return self
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()}")
            time.sleep(0.5)
        raise RuntimeError(f"the local Slurm cluster did not come up in {timeout:.0f} s:\n{self.logs()}")

    def _start_munge(self) -> None:
        if MUNGE_SOCKET.exists() and subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already serving this machine
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create"], check=True)
        subprocess.run(["munged", "--force"], check=True)
        self._munged_started = True
        for _ in range(50):
            if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not start")

    def daemon_pids(self) -> list[int]:
        """The pids of the daemons this cluster started (slurmctld, slurmd and, when it started it, munged)."""
        pids = [p.pid for p in self._procs]
        pid_file = Path("/run/munge/munged.pid")
        if self._munged_started and pid_file.exists():
            pids.append(int(pid_file.read_text().strip()))
        return pids

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, check=check, capture_output=True, text=True)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s: {info}\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.state / name
            if path.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is left, stop slurmd and slurmctld (and munged when this cluster started it)."""
        self.run("scancel", "--user", os.environ.get("USER", "root"), check=False)
        for p in reversed(self._procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._procs.clear()
        if self._munged_started:
            pid_file = Path("/run/munge/munged.pid")
            if pid_file.exists():
                pid = int(pid_file.read_text().strip())
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                for _ in range(100):  # munged is not our child: poll until it has gone
                    if not is_running(pid):
                        break
                    time.sleep(0.1)
            self._munged_started = False
