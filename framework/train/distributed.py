"""Process-group set-up and the few collectives the training loop needs.

`init_distributed` reads the launcher's environment: torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`MASTER_ADDR`, `MASTER_PORT`), or Slurm's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, with
`MASTER_ADDR`/`MASTER_PORT` exported by the batch script). A process started without a launcher becomes
a world of one, so `sapling distill deepspeed=zero2` also runs as a plain command. The backend is gloo
on CPU and nccl on CUDA; DeepSpeed's communication layer is initialised on top of the torch group.

Every helper here is a no-op (or the identity) without an initialised process group, so the
single-process path pays nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun or Slurm variables; exported as torchrun's names."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        if world > 1 and "MASTER_ADDR" not in env:
            raise RuntimeError("srun launched several tasks but MASTER_ADDR is not set; export MASTER_ADDR (the "
                               "first node of $SLURM_JOB_NODELIST) and MASTER_PORT in the batch script")
    else:
        rank, world, local = 0, 1, 0
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if world > 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-process run; launch with torchrun or export it")
        env["MASTER_PORT"] = str(_free_port())
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    return rank, world, local


def init_distributed(device_type: str) -> DistEnv:
    """Initialise torch.distributed (and DeepSpeed's comm layer) once; returns this process's place in it.

    `device_type` is "cuda" or "cpu": it picks nccl or gloo and, on CUDA, this rank's GPU (`LOCAL_RANK`).
    """
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks an accelerator
    rank, world, local = _launcher_env()
    if device_type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=device)


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def sum_across_ranks(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of `values` over all ranks (float64, so integer counts stay exact)."""
    if rank_world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_across_ranks(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is True on at least one (e.g. a signal only some ranks received)."""
    if rank_world()[1] == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """ZeRO-3 partitioned `params` whole (read-only) inside the block; a no-op for ordinary parameters."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def shutdown_distributed() -> None:
    """Leave the process group (if this process joined one), so the backend shuts down cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
