"""Deterministic document-level train/validation split."""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on a uint64 array (wrap-around arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def document_hash(seed: int, num_docs: int) -> np.ndarray:
    """Uniform values in [0, 1) from a hash of (seed, doc index), for doc indices 0..num_docs-1."""
    seed_key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    keys = _splitmix64(seed_key ^ np.arange(num_docs, dtype=np.uint64))
    return (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53


def split_documents(num_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over documents, True = validation.

    Document ``i`` goes to validation when ``document_hash(seed)[i] < val_fraction``; the result
    depends only on (seed, i), so appending documents never moves earlier ones. When
    ``val_fraction > 0`` there is at least one validation and one training document: the doc with the
    smallest hash is forced into validation, the one with the largest into training. A single document
    cannot be split: that raises ValueError (use val_fraction=0).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    u = document_hash(seed, num_docs)
    is_val = u < val_fraction
    if val_fraction > 0 and num_docs > 0:
        if num_docs < 2:
            raise ValueError(
                f"cannot split {num_docs} document into train and val (val_fraction={val_fraction}); "
                "give at least 2 documents or set val_fraction=0"
            )
        if not is_val.any():
            is_val[np.argmin(u)] = True
        if is_val.all():
            is_val[np.argmax(u)] = False
    return is_val
