"""Infinite, deterministic, resumable micro-batch loader over packed blocks.

Global sample order: epoch ``e`` is a permutation of ``range(num_blocks)`` drawn from a numpy
Generator seeded with ``(seed, e)`` (identity when ``shuffle=False``); epochs are concatenated into an
infinite sequence. Global step ``s`` consumes positions ``[s*B*W, (s+1)*B*W)`` of that sequence and
rank ``r`` takes the slice ``[r*B, (r+1)*B)`` of it. Batches may straddle epochs, nothing is dropped.

The only state is ``consumed_samples`` (a position in the global sequence), so a run saved with one
world size / micro-batch size resumes under any other without dropping or repeating a sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from sapling.data.blocks import PackedBlocks, block_batch
from sapling.data.mixture import CHUNK, MixtureOrder
from sapling.errors import CheckpointError

_RESUME_FIX = ("fix: resume with the settings the checkpoint was written with, or start over in a new output_dir "
               "(or with trainer.overwrite=true, which moves this run aside)")

_MASK64 = (1 << 64) - 1


class ResumableLoader:
    """Yields ``{"input_ids", "labels"}`` LongTensors ``[micro_batch_size, seq_len]`` forever.

    ``labels`` equals ``input_ids`` (the model/loss shifts), -100 where the blocks' label mask is off (chat data:
    the non-assistant tokens); per-document blocks add ``position_ids``; ``index`` holds the blocks' indices. See the
    module docstring for the order.
    Blocks whose ``get_batch`` returns a dict (a teacher cache) add their other keys to each batch.
    """

    def __init__(
        self,
        blocks: PackedBlocks,
        micro_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        mixture: MixtureOrder | None = None,
    ) -> None:
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if len(blocks) == 0:
            raise ValueError("cannot load from 0 blocks")
        self.blocks = blocks
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_blocks = len(blocks)
        self.consumed_samples = 0
        self.mixture = mixture  # a data mixture: its weighted order over the sources' blocks replaces the epochs
        self._perms: dict[int, np.ndarray] = {}  # at most two epochs (a batch may straddle a boundary)

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to be consumed."""
        return self.consumed_samples // self.num_blocks

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """Block order of ``epoch`` (cached for the current and previous epoch)."""
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                rng = np.random.default_rng([self.seed & _MASK64, epoch])
                perm = rng.permutation(self.num_blocks)
            else:
                perm = np.arange(self.num_blocks)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = perm
        return perm

    def sample_indices(self, start: int, count: int) -> np.ndarray:
        """Block indices at global positions ``[start, start + count)`` of the infinite sample order."""
        if self.mixture is not None:
            return self.mixture.indices(start, count)
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(start + filled, self.num_blocks)
            take = min(count - filled, self.num_blocks - offset)
            out[filled : filled + take] = self.epoch_permutation(epoch)[offset : offset + take]
            filled += take
        return out

    def _fetch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """``{"input_ids", "labels"}`` (and ``position_ids`` of per-document packing), plus whatever else the
        blocks carry (a teacher cache: the teacher's top-k)."""
        if not isinstance(self.blocks, PackedBlocks) and hasattr(self.blocks, "get_batch"):
            out = self.blocks.get_batch(indices)
            out = out if isinstance(out, dict) else {"input_ids": out}
            return {**out, "labels": out["input_ids"].clone()}
        return block_batch(self.blocks, indices)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batch, world = self.micro_batch_size, self.world_size
        while True:
            indices = self.sample_indices(self.consumed_samples + self.rank * batch, batch)
            fetched = self._fetch(indices)
            self.consumed_samples += batch * world
            yield {**fetched, "index": torch.from_numpy(indices)}

    def state_dict(self) -> dict[str, Any]:
        """Resumable state; ``consumed_samples`` counts global samples and is world-size independent."""
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "num_blocks": self.num_blocks,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            **({"mix_quota": self.mixture.quota.tolist()} if self.mixture is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state``; CheckpointError if it was saved for other data (num_blocks) or another seed."""
        missing = [k for k in ("consumed_samples", "seed", "num_blocks") if k not in state]
        if missing:
            raise CheckpointError(f"the checkpoint's loader state is missing keys {missing}; {_RESUME_FIX}")
        if int(state["num_blocks"]) != self.num_blocks:
            raise CheckpointError(
                f"the checkpoint's loader state was saved with num_blocks={int(state['num_blocks'])} but this loader "
                f"has {self.num_blocks} blocks: the packed data changed (files, tokenizer, seq_len or max_tokens); "
                f"{_RESUME_FIX}"
            )
        if int(state["seed"]) != self.seed:
            raise CheckpointError(
                f"the checkpoint's loader state was saved with trainer.seed={int(state['seed'])} but this run has "
                f"trainer.seed={self.seed}; {_RESUME_FIX}"
            )
        if "shuffle" in state and bool(state["shuffle"]) != self.shuffle:
            raise CheckpointError(
                f"the checkpoint's loader state was saved with shuffle={bool(state['shuffle'])} "
                f"but this loader has shuffle={self.shuffle}; {_RESUME_FIX}"
            )
        quota = self.mixture.quota.tolist() if self.mixture is not None else None
        if state.get("mix_quota") != quota:
            raise CheckpointError(
                f"the checkpoint's loader state was saved with data mixture quotas {state.get('mix_quota')} (samples "
                f"per {CHUNK} of each source) but this run has {quota}: data.mix changed; {_RESUME_FIX}"
            )
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise CheckpointError(f"the checkpoint's loader state has consumed_samples={consumed} (< 0); {_RESUME_FIX}")
        self.consumed_samples = consumed
