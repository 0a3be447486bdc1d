"""Process-group set-up from the launcher's environment, and the few collectives the training loop needs.

`launch_env` reads, in this order:

- torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), also
  when torchrun itself was started by `srun` (`launchers/slurm.sbatch`);
- submitit's local executor (`SUBMITIT_LOCAL_GLOBALID`, `SUBMITIT_LOCAL_NTASKS`, ...): a Hydra sweep with
  `hydra/launcher=submitit_local` and several tasks per job;
- Slurm tasks started by `srun` (`SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_STEP_NUM_TASKS`), which covers
  `hydra/launcher=submitit_slurm` too: the head node is the first host of `SLURM_STEP_NODELIST` and the
  port is derived from the job id unless `MASTER_ADDR`/`MASTER_PORT` are exported;
- nothing: a world of one, so `sapling distill deepspeed=zero2` also runs as a plain command (and so
  does a command run straight in a batch script, outside `srun`).

Inconsistent variables (a rank outside the world, half of torchrun's set, a local rank with no GPU of its
own) stop the run with one line naming the variables. The backend is nccl on CUDA and gloo on CPU;
DeepSpeed's communication layer is initialised on top of the torch group.

A rank that fails exits (non-zero); torchrun then stops the other ranks (SIGTERM, SIGKILL 30 s later) and
Slurm does too (`srun --kill-on-bad-exit`, as in `launchers/slurm.sbatch`). Where no launcher does, a rank
waiting for a dead peer fails once the process group's timeout passes: `SAPLING_DIST_TIMEOUT_S` seconds
(default 600; DeepSpeed's `DEEPSPEED_TIMEOUT`, in minutes, is honoured when that is not set). Raise it for
collectives that legitimately wait long (a rank-0 export of a very large model while the others wait). The
helpers below turn a peer's failure seen in a collective into one `LaunchError` line instead of a traceback.

Every helper below `init_distributed` is a no-op (or the identity) without an initialised process
group, so the single-process path pays nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sapling import faults
from sapling.errors import LaunchError  # also `from sapling.dist import LaunchError`

TIMEOUT_ENV = "SAPLING_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the world as the launcher described it (before any process group exists)."""

    source: str  # "torchrun" | "submitit-local" | "slurm" | "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int | None  # None: a world of one picks a free port


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list as host names: `gpu[01-03,07],login1` -> gpu01 gpu02 gpu03 gpu07 login1.

    The same expansion as `scontrol show hostnames`, without needing Slurm's binaries on the node.
    """
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", hostlist):
        hosts.extend(_expand_one(item))
    return hosts


def _expand_one(item: str) -> list[str]:
    m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", item)
    if m is None:
        return [item]
    prefix, ranges, rest = m.groups()
    out = []
    for part in ranges.split(","):
        lo, sep, hi = part.partition("-")
        if not sep:
            values = [lo]
        else:
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise LaunchError(f"cannot read the Slurm host list range {part!r} in {item!r}")
            values = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        out.extend(prefix + v + tail for v in values for tail in _expand_one(rest))
    return out


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise LaunchError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def _port_from_job_id(job_id: str) -> int:
    """A port every task of one job derives alike (and another job most likely not): 20000 + id mod 40000."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 40000


def launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read the launcher's variables (default: `os.environ`); raise `LaunchError` when they disagree."""
    env = os.environ if env is None else env
    torchrun_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    present = [k for k in torchrun_keys if k in env]
    if present:
        if len(present) < len(torchrun_keys):
            missing = [k for k in torchrun_keys if k not in env]
            raise LaunchError(f"{', '.join(present)} set but {', '.join(missing)} not: launch with torchrun "
                              "(or export all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
        world = _int(env, "WORLD_SIZE")
        launch = LaunchEnv("torchrun", _int(env, "RANK"), world, _int(env, "LOCAL_RANK"),
                           _int(env, "LOCAL_WORLD_SIZE", world), env.get("MASTER_ADDR", "127.0.0.1"),
                           _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None)
        if world > 1 and launch.master_port is None:
            raise LaunchError(f"WORLD_SIZE={world} but MASTER_PORT is not set: launch with torchrun or "
                              "export MASTER_ADDR and MASTER_PORT")
        return _checked(launch, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    if "SUBMITIT_LOCAL_GLOBALID" in env:
        world = _int(env, "SUBMITIT_LOCAL_NTASKS")
        launch = LaunchEnv("submitit-local", _int(env, "SUBMITIT_LOCAL_GLOBALID"), world,
                           _int(env, "SUBMITIT_LOCAL_LOCALID"), world, env.get("MASTER_ADDR", "127.0.0.1"),
                           _int(env, "MASTER_PORT") if "MASTER_PORT" in env
                           else _port_from_job_id(env.get("SUBMITIT_LOCAL_JOB_ID", "0")))
        return _checked(launch, "SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS", "SUBMITIT_LOCAL_LOCALID",
                        "SUBMITIT_LOCAL_NTASKS")
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        # A task of an srun step. (A batch script has SLURM_PROCID/SLURM_NTASKS too, but no step: a
        # command run there directly is one process, whatever the allocation.)
        world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        head = env.get("MASTER_ADDR") or expand_hostlist(nodes)[0]
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _port_from_job_id(env.get("SLURM_JOB_ID", "0"))
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
        # "2(x3),1": 2 tasks on each of 3 nodes, then 1; the largest count bounds the local ranks.
        counts = [int(v) for v in re.findall(r"\d+(?=\(x\d+\)|,|$)", per_node)]
        local_world = max(counts) if counts else world
        launch = LaunchEnv("slurm", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0), local_world,
                           head, port)
        return _checked(launch, "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID",
                        "SLURM_STEP_TASKS_PER_NODE")
    return LaunchEnv("single", 0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), None)


def _checked(launch: LaunchEnv, rank_var: str, world_var: str, local_var: str, local_world_var: str) -> LaunchEnv:
    if launch.world_size < 1:
        raise LaunchError(f"{world_var}={launch.world_size}: a world needs at least one process")
    if not 0 <= launch.rank < launch.world_size:
        raise LaunchError(f"{rank_var}={launch.rank} is outside {world_var}={launch.world_size} (ranks are "
                          f"0..{launch.world_size - 1}): the launcher's variables disagree")
    if not 0 <= launch.local_rank < launch.local_world_size:
        raise LaunchError(f"{local_var}={launch.local_rank} is outside {local_world_var}="
                          f"{launch.local_world_size} (local ranks are 0..{launch.local_world_size - 1})")
    if launch.local_world_size > launch.world_size:
        raise LaunchError(f"{local_world_var}={launch.local_world_size} exceeds {world_var}={launch.world_size}")
    return launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_timeout(env: Mapping[str, str] | None = None) -> datetime.timedelta:
    """How long a collective waits for its peers: `SAPLING_DIST_TIMEOUT_S` seconds, else DeepSpeed's
    `DEEPSPEED_TIMEOUT` minutes, else 600 s."""
    env = os.environ if env is None else env
    if TIMEOUT_ENV in env:
        raw, name, scale = env[TIMEOUT_ENV], TIMEOUT_ENV, 1.0
    elif "DEEPSPEED_TIMEOUT" in env:
        raw, name, scale = env["DEEPSPEED_TIMEOUT"], "DEEPSPEED_TIMEOUT", 60.0
    else:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw) * scale
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise LaunchError(f"{name}={raw!r} is not a positive number of {'seconds' if scale == 1 else 'minutes'}: "
                          f"unset it (default {DEFAULT_TIMEOUT_S:.0f} s) or set e.g. {TIMEOUT_ENV}=1800")
    return datetime.timedelta(seconds=seconds)


# How a collective reports that a peer died or stopped answering (gloo, NCCL, the TCP store).
_PEER_FAILURE = ("closed by peer", "reset by peer", "broken pipe", "timed out", "timeout", "remote worker",
                 "communicator was aborted", "connection refused")


@contextlib.contextmanager
def peer_failures(what: str) -> Iterator[None]:
    """Inside the block, a collective that fails because another rank died or stopped answering raises a
    one-line LaunchError (that rank printed the cause) instead of a backend traceback."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if not (isinstance(err, dist.DistBackendError) or any(m in text.lower() for m in _PEER_FAILURE)):
            raise
        first = (text.strip().splitlines() or [""])[0][:200]
        rank, world = rank_world()
        raise LaunchError(f"rank {rank}/{world}: {what} failed because another rank exited or stopped answering "
                          f"({type(err).__name__}: {first}); the cause is that rank's own error above (a rank "
                          f"waits at most {TIMEOUT_ENV}={dist_timeout().total_seconds():.0f} s for its peers)") from err


def init_distributed(device_type: str) -> DistEnv:
    """Initialise torch.distributed (and DeepSpeed's comm layer) once; returns this process's place in it.

    `device_type` is "cuda" or "cpu": it picks nccl or gloo and, on CUDA, this rank's GPU (the local
    rank). The launcher's variables are exported under torchrun's names, which DeepSpeed reads.
    """
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks an accelerator
    launch = launch_env()
    port = launch.master_port if launch.master_port is not None else _free_port()
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank),
                      LOCAL_WORLD_SIZE=str(launch.local_world_size), MASTER_ADDR=launch.master_addr,
                      MASTER_PORT=str(port))
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise LaunchError(f"local rank {launch.local_rank} ({launch.source}) but this node has {count} GPU(s): "
                              "start one process per GPU (torchrun --nproc-per-node / --gpus-per-node)")
        torch.cuda.set_device(launch.local_rank)
        device = torch.device("cuda", launch.local_rank)
    else:
        device = torch.device("cpu")
    import deepspeed

    if device_type == "cpu":
        # DeepSpeed's CPU shared-memory comm op serves only its inference all-reduce, which Sapling never calls,
        # yet init_distributed JIT-compiles it on a machine's first run (1-2 min): mark it unavailable.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False, timeout=dist_timeout())
    faults.after_join(dist.get_rank())  # test-only seam (sapling.faults), a no-op in real runs
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=launch.local_rank,
                   device=device)


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        with peer_failures("a barrier"):
            dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed element-wise over all ranks, in place on its device (no host sync); `t` as it is alone."""
    if rank_world()[1] > 1:
        with peer_failures("an all-reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_across_ranks(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is True on at least one (e.g. a signal only some ranks received)."""
    if rank_world()[1] == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    with peer_failures("an all-reduce"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    with peer_failures("a broadcast"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def gathered(params: Iterable[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """ZeRO-3 partitioned `params` whole (read-only: partitioned again on exit, nothing broadcast) inside the
    block; a no-op for ordinary parameters. A collective when any is partitioned: every rank must enter it."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def shutdown_distributed() -> None:
    """Leave the process group (if this process joined one), so the backend shuts down cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
