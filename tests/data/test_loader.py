"""ResumableLoader: global order, sharding, determinism and world-size-independent resume."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from sapling.data import PackedBlocks, ResumableLoader

SEQ = 4


def make_blocks(n: int) -> PackedBlocks:
    """Block i holds tokens [i*SEQ, (i+1)*SEQ), so a row identifies its block index."""
    return PackedBlocks(np.arange(n * SEQ, dtype=np.int64).reshape(n, SEQ))


def block_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    x = batch["input_ids"]
    assert torch.equal(x, batch["labels"]) and x.dtype == torch.long and x.shape[1] == SEQ
    assert torch.equal(x - x[:, :1], torch.arange(SEQ).expand_as(x))  # rows are whole blocks
    return (x[:, 0] // SEQ).tolist()


def global_order(blocks: PackedBlocks, count: int, seed: int = 0, shuffle: bool = True) -> list[int]:
    """The reference order: an uninterrupted single-process loader with micro batch 1."""
    it = iter(ResumableLoader(blocks, 1, seed=seed, shuffle=shuffle))
    return [block_ids(next(it))[0] for _ in range(count)]


def run_steps(loaders: list[ResumableLoader], steps: int) -> list[int]:
    """Run every rank for ``steps`` steps; return the samples of each global batch in rank order."""
    its = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        for it in its:
            out.extend(block_ids(next(it)))
    return out


def test_each_epoch_is_a_permutation_and_epochs_differ():
    n = 13
    order = global_order(make_blocks(n), 3 * n)
    epochs = [order[i * n : (i + 1) * n] for i in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(n))
    assert global_order(make_blocks(n), 2 * n, shuffle=False) == list(range(n)) * 2


def test_order_is_seeded_and_ignores_global_rng():
    blocks = make_blocks(50)
    torch.manual_seed(1)
    np.random.seed(1)
    a = global_order(blocks, 120, seed=7)
    torch.manual_seed(2)
    np.random.seed(2)
    assert global_order(blocks, 120, seed=7) == a
    assert global_order(blocks, 120, seed=8) != a


def test_ranks_take_contiguous_slices_of_each_global_batch():
    n, b, w = 11, 2, 3
    blocks = make_blocks(n)
    ref = global_order(blocks, 5 * b * w)
    loaders = [ResumableLoader(blocks, b, rank=r, world_size=w) for r in range(w)]
    its = [iter(loader) for loader in loaders]
    for step in range(5):
        for r, it in enumerate(its):
            start = step * b * w + r * b
            assert block_ids(next(it)) == ref[start : start + b]
    assert all(loader.state_dict()["consumed_samples"] == 5 * b * w for loader in loaders)


@pytest.mark.parametrize(("w1", "w2"), list(itertools.product([1, 2, 3], [1, 2, 4])))
def test_resume_across_world_sizes_is_exact(w1, w2):
    n, b1, b2 = 17, 3, 2
    blocks = make_blocks(n)
    steps1 = 2  # stops mid-epoch 0 ...
    steps2 = (2 * n) // (b2 * w2) + 1  # ... and crosses at least one epoch boundary after resuming
    first = [ResumableLoader(blocks, b1, rank=r, world_size=w1, seed=3) for r in range(w1)]
    seen = run_steps(first, steps1)
    states = [loader.state_dict() for loader in first]
    assert all(s == states[0] for s in states)
    state = json.loads(json.dumps(states[0]))  # plain, serialisable ints
    assert state["consumed_samples"] == steps1 * b1 * w1 and state["epoch"] == steps1 * b1 * w1 // n

    second = [ResumableLoader(blocks, b2, rank=r, world_size=w2, seed=3) for r in range(w2)]
    for loader in second:
        loader.load_state_dict(state)
    seen += run_steps(second, steps2)
    total = steps1 * b1 * w1 + steps2 * b2 * w2
    assert total > 2 * n
    assert seen == global_order(blocks, total, seed=3)  # nothing dropped, nothing repeated
    assert second[0].epoch == total // n == second[0].state_dict()["epoch"]


def test_batches_straddle_epochs_without_dropping():
    n, b = 5, 3
    it = iter(ResumableLoader(make_blocks(n), b, seed=0))
    seen = [i for _ in range(5) for i in block_ids(next(it))]  # 15 samples = 3 full epochs
    assert all(sorted(seen[e * n : (e + 1) * n]) == list(range(n)) for e in range(3))


def test_state_mismatch_raises():
    loader = ResumableLoader(make_blocks(10), 2, seed=0)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="num_blocks=10.*11 blocks"):
        ResumableLoader(make_blocks(11), 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0.*seed=1"):
        ResumableLoader(make_blocks(10), 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle"):
        ResumableLoader(make_blocks(10), 2, seed=0, shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        loader.load_state_dict({"seed": 0})
    with pytest.raises(ValueError, match="rank"):
        ResumableLoader(make_blocks(10), 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="0 blocks"):
        ResumableLoader(make_blocks(0), 2)


def test_state_advances_per_yielded_batch_and_resume_mid_iteration():
    blocks = make_blocks(9)
    loader = ResumableLoader(blocks, 2, rank=1, world_size=2, seed=4)
    it = iter(loader)
    assert loader.state_dict()["consumed_samples"] == 0
    next(it)
    next(it)
    assert loader.state_dict()["consumed_samples"] == 8 and loader.epoch == 0
    next(it)
    assert loader.epoch == 1  # 12 samples consumed of 9 blocks


def test_large_num_blocks_is_cheap():
    n = 5_000_000
    huge = PackedBlocks(np.broadcast_to(np.arange(SEQ, dtype=np.uint16), (n, SEQ)))  # no real memory
    loader = ResumableLoader(huge, 8, rank=0, world_size=4, seed=0)
    loader.load_state_dict({"consumed_samples": 3 * n - 5, "seed": 0, "num_blocks": n})
    batch = next(iter(loader))  # straddles epochs 2 -> 3: two permutations computed
    assert batch["input_ids"].shape == (8, SEQ) and loader.epoch == 3
