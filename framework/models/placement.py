"""Where a model lives: the one placement rule for every model and module Sapling builds (teacher, student,
the pruned student, feature projections, the module a training engine trains)."""

from __future__ import annotations

import torch
from torch import nn


def place(module: nn.Module, device: torch.device | str) -> nn.Module:
    """`module` moved to `device` in place (dtype unchanged) and returned.

    A model partitioned by DeepSpeed ZeRO-3 (its parameters carry a `ds_id`) is left where DeepSpeed keeps it:
    each rank holds its shard on its own device and the engine gathers a layer there for its forward.
    """
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        return module
    return module.to(device)
