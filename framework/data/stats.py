"""Corpus statistics: the unigram baseline."""

from __future__ import annotations

import numpy as np

from sapling.data.blocks import PackedBlocks

_ROWS_PER_CHUNK = 1 << 14  # bounds memory when counting over memory-mapped arrays


def _counts(blocks: PackedBlocks, vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    arr = blocks.array
    for start in range(0, len(blocks), _ROWS_PER_CHUNK):
        chunk = np.asarray(arr[start : start + _ROWS_PER_CHUNK]).ravel()
        if chunk.size and int(chunk.max()) >= vocab_size:
            raise ValueError(f"token id {int(chunk.max())} >= vocab_size={vocab_size}")
        counts += np.bincount(chunk, minlength=vocab_size)
    return counts


def unigram_cross_entropy(train: PackedBlocks, val: PackedBlocks, vocab_size: int) -> float:
    """Nats/token of ``val`` under add-one-smoothed unigram frequencies of ``train``.

    ``p(t) = (count_train(t) + 1) / (num_train_tokens + vocab_size)``; perplexity is ``exp`` of the result.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    if len(val) == 0:
        raise ValueError("val has no blocks: cannot compute a cross-entropy")
    train_counts = _counts(train, vocab_size)
    val_counts = _counts(val, vocab_size)
    log_p = np.log(train_counts + 1.0) - np.log(float(train_counts.sum() + vocab_size))
    return float(-(val_counts * log_p).sum() / val_counts.sum())
