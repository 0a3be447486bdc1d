"""Packed token blocks: a read-only [num_blocks, seq_len] array exposed as a sequence of LongTensors.

Blocks of chat data or of per-document packing carry two more arrays of the same shape: `label_mask`
(whether a token is a target: an assistant token, not a document's first token, not padding) and
`positions` (position ids restarting at 0 at each document, so attention stays within a document).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100  # a label left out of every loss and count (HF's and torch's cross-entropy default)


class PackedBlocks:
    """Sequence of ``seq_len``-token blocks backed by a (possibly memory-mapped) numpy array.

    ``array`` is either 2-D ``[num_blocks, seq_len]`` or a 1-D token stream together with ``seq_len``
    (the final partial block is dropped). Items are ``torch.LongTensor`` of shape ``[seq_len]``.
    ``label_mask`` and ``positions`` (optional, the array's 2-D shape) go into ``batch``'s labels and
    position ids.
    """

    def __init__(self, array: np.ndarray, seq_len: int | None = None, *, label_mask: np.ndarray | None = None,
                 positions: np.ndarray | None = None) -> None:
        if not isinstance(array, np.ndarray):  # keeps np.memmap as is
            array = np.asarray(array)
        if array.ndim == 1:
            if seq_len is None or seq_len <= 0:
                raise ValueError(f"seq_len must be > 0 to cut a 1-D token stream into blocks, got {seq_len}")
            n = array.shape[0] // seq_len
            array = array[: n * seq_len].reshape(n, seq_len)
        elif array.ndim != 2 or (seq_len is not None and array.shape[1] != seq_len):
            raise ValueError(f"expected a [num_blocks, {seq_len}] array, got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"token array must have an integer dtype, got {array.dtype}")
        for name, extra in (("label_mask", label_mask), ("positions", positions)):
            if extra is not None and extra.shape != array.shape:
                raise ValueError(f"{name} has shape {extra.shape}, the tokens {array.shape}")
        self._array = array
        self.label_mask = label_mask
        self.positions = positions

    @property
    def array(self) -> np.ndarray:
        """The underlying ``[num_blocks, seq_len]`` array (do not modify)."""
        return self._array

    @property
    def seq_len(self) -> int:
        return int(self._array.shape[1])

    @property
    def num_tokens(self) -> int:
        """Number of tokens in all blocks: ``len(self) * seq_len``."""
        return len(self) * self.seq_len

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def __getitem__(self, i: int | slice) -> torch.Tensor | PackedBlocks:
        if isinstance(i, slice):
            return PackedBlocks(self._array[i], label_mask=None if self.label_mask is None else self.label_mask[i],
                                positions=None if self.positions is None else self.positions[i])
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"block index {i} out of range for {n} blocks")
        return torch.from_numpy(self._array[i].astype(np.int64))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Stack the blocks at ``indices`` into a LongTensor ``[len(indices), seq_len]``."""
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self._array[idx].astype(np.int64))

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """``{"input_ids", "labels"}`` LongTensors ``[len(indices), seq_len]`` (labels -100 where the label mask
        is off), with ``position_ids`` when the blocks are packed per document."""
        idx = np.asarray(indices, dtype=np.int64)
        ids = torch.from_numpy(self._array[idx].astype(np.int64))
        labels = ids.clone()
        if self.label_mask is not None:
            labels.masked_fill_(~torch.from_numpy(np.asarray(self.label_mask[idx], dtype=bool)), IGNORE_INDEX)
        out = {"input_ids": ids, "labels": labels}
        if self.positions is not None:
            out["position_ids"] = torch.from_numpy(self.positions[idx].astype(np.int64))
        return out

    def __repr__(self) -> str:
        return f"PackedBlocks(num_blocks={len(self)}, seq_len={self.seq_len}, dtype={self._array.dtype})"


def block_batch(blocks: Any, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
    """The blocks at `indices` as a batch: ``PackedBlocks.batch``, or for any sequence of token tensors
    ``{"input_ids", "labels"}`` with every token a label."""
    if isinstance(blocks, PackedBlocks):
        return blocks.batch(indices)
    ids = torch.stack([blocks[int(i)] for i in indices])
    return {"input_ids": ids, "labels": ids.clone()}


@dataclass
class PackedData:
    """Result of ``build_packed_data``: train/val blocks and the fingerprint of the inputs.

    ``meta`` holds bookkeeping (document and token counts per split).
    """

    train: PackedBlocks
    val: PackedBlocks
    fingerprint: str
    meta: dict = field(default_factory=dict)
