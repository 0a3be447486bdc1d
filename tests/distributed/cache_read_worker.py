"""torchrun worker: each of 2 ranks reads its share of one epoch of a teacher cache through the trainer's loader.

argv: result.json cache_dir. Every rank opens the cache (the sha256 verification is split over the ranks),
iterates one epoch with micro-batch 1 and records a digest of every batch (token ids + the teacher's top-k);
rank 0 gathers all ranks' digests into result.json.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch.distributed as dist

from sapling.data import ResumableLoader
from sapling.dist import init_distributed, shutdown_distributed
from sapling.distill.teacher_cache import TeacherCache


def digest(batch: dict) -> str:
    h = hashlib.sha1()
    for key in ("input_ids", "teacher_lp", "teacher_idx"):
        h.update(batch[key].numpy().tobytes())
    return h.hexdigest()


def main(result: str, cache_dir: str) -> None:
    env = init_distributed("cpu")
    blocks = TeacherCache(cache_dir).packed_data().train
    loader = ResumableLoader(blocks, 1, rank=env.rank, world_size=env.world_size, seed=7)
    batches = iter(loader)
    mine = [digest(blocks.decode(next(batches))) for _ in range(len(blocks) // env.world_size)]
    everyone: list = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    if env.rank == 0:
        with open(result, "w") as f:
            json.dump({"digests": everyone, "consumed": loader.consumed_samples}, f)
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
