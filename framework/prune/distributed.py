"""Pruning at scale: data-parallel reductions and ZeRO-3 partitioned teachers.

Calibration is shared out over the ranks and the importance accumulators are summed with
`sapling.dist.all_reduce_sum` (rank, world size and parameter gathering are `sapling.dist`'s too). A
teacher whose parameters are ZeRO-3 partitioned (built under `deepspeed.zero.Init`, possibly wrapped by a
DeepSpeed engine) is never gathered whole: it is processed one *gather unit* at a time, a unit being one
decoder layer or one leaf module outside them (embeddings, final norm, lm_head).

DeepSpeed is imported only when a partitioned model is actually seen, so ordinary models pay nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sapling.dist import gathered, rank_world


def max_across_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The largest `value` over all ranks (a collective: every rank must call it); `value` on one process."""
    if rank_world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ------------------------------------------------------------------------------------------------ ZeRO-3


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True when the parameters of `model` are DeepSpeed ZeRO-3 parameters (they carry a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _engine_managed(model: nn.Module) -> bool:
    """True when a DeepSpeed engine has hooked `model` (it tags every module with a `ds_id`), so that the
    engine's own hooks fetch parameters during forward passes."""
    return isinstance(getattr(model, "ds_id", None), int)


def gather_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(state-dict prefix, module) of the units a partitioned model is gathered by, in module order.

    A unit is an element of a `ModuleList` (a decoder layer) or a leaf module outside such lists. Between
    them the units hold every parameter and buffer of the model exactly once.
    """
    units: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        children = list(module.named_children())
        if not children:
            units.append((prefix, module))
            return
        own = [n for n, _ in module.named_parameters(recurse=False)]
        own += [n for n, _ in module.named_buffers(recurse=False)]
        if own:
            raise ValueError(f"{type(module).__name__} at {prefix or '<root>'!r} holds {own} besides "
                             "submodules; it cannot be gathered unit by unit")
        for name, child in children:
            if isinstance(child, nn.ModuleList):
                units.extend((f"{prefix}{name}.{i}.", m) for i, m in enumerate(child))
            else:
                walk(child, f"{prefix}{name}.")

    walk(model, "")
    return units


@contextlib.contextmanager
def gathered_forward(model: nn.Module) -> Iterator[None]:
    """Let forward passes run on a ZeRO-3 partitioned model that no DeepSpeed engine manages.

    Each gather unit's parameters are gathered by a pre-forward hook and partitioned again after its
    forward, so at most one decoder layer is whole at a time. A no-op for ordinary models and for
    engine-managed ones (the engine's hooks fetch parameters themselves). Every rank must run the same
    forward passes inside it.
    """
    nested = getattr(model, "_sapling_gathering", False)
    if nested or not is_zero3_partitioned(model) or _engine_managed(model):
        yield
        return
    open_contexts: dict[int, Any] = {}

    def gather(module: nn.Module, _args: tuple) -> None:
        if id(module) not in open_contexts:
            ctx = gathered(module.parameters())
            ctx.__enter__()
            open_contexts[id(module)] = ctx

    def release(module: nn.Module, _args: tuple, _out: Any) -> None:
        ctx = open_contexts.pop(id(module), None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    handles = []
    for _, unit in gather_units(model):
        if any(True for _ in unit.parameters()):
            handles.append(unit.register_forward_pre_hook(gather))
            handles.append(unit.register_forward_hook(release))
    model._sapling_gathering = True
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for ctx in open_contexts.values():  # left open by a forward pass that raised
            ctx.__exit__(None, None, None)
        del model._sapling_gathering
