"""Calibration and held-out batches: training blocks drawn in a seeded order, for importance scores, GPTQ
and ranking prune candidates (none of them trains on these batches)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from sapling.data.blocks import block_batch
from sapling.errors import DataError


def calibration_batches(blocks: Any, samples: int, batch_size: int, device: torch.device | str, seed: int = 0,
                        rank: int = 0, world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Up to `samples` training blocks, drawn in a seeded order, as {"input_ids", "labels"} [B, L] batches
    (with "position_ids" for per-document blocks: see sapling.data.blocks).

    With `world_size` > 1, this rank's share only: a contiguous slice of the same global order, the
    shares disjoint and covering it, their sizes differing by at most one (a share may be empty).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    order = np.random.default_rng(seed).permutation(len(blocks))[: min(samples, len(blocks))]
    order = np.array_split(order, world_size)[rank]
    for start in range(0, len(order), batch_size):
        yield {k: v.to(device) for k, v in block_batch(blocks, order[start:start + batch_size]).items()}


def heldout_batches(blocks: Any, skip: int, batches: int, batch_size: int, device: torch.device | str,
                    seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Up to `batches` batches of training blocks that the first `skip` blocks of the same seeded order
    (the calibration sample of :func:`calibration_batches`) did not use."""
    order = np.random.default_rng(seed).permutation(len(blocks))
    rest = order[min(skip, len(blocks)):]
    if len(rest) == 0:
        raise DataError(f"no training blocks left after the {skip} calibration samples to rank "
                        "prune candidates on; fix: lower prune.calibration.samples or add data")
    rest = rest[:batches * batch_size]
    return [{k: v.to(device) for k, v in block_batch(blocks, rest[j:j + batch_size]).items()}
            for j in range(0, len(rest), batch_size)]
