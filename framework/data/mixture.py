"""Data mixtures: several sources packed alike, concatenated into one block store, and sampled by weight.

The sample order is deterministic and random-access, so a run resumes mid-epoch at any world size from the
loader's one number (`consumed_samples`). Positions come in chunks of `CHUNK`: each chunk holds exactly
`quotas(weights)[s]` samples of source `s` (largest-remainder rounding of `weight * CHUNK`), in an order
shuffled per chunk by `(seed, chunk)`. The k-th sample of source `s` is block `k % n_s` of that source's
permutation for epoch `k // n_s` (seeded by `(seed, s, epoch)`), so every source goes through all its blocks
once per its own epoch, however often the mixture returns to it. How many samples of each source came before
position p takes O(1): `p // CHUNK` whole chunks of quotas, plus a count within the current chunk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from sapling.data import cache
from sapling.data.blocks import PackedBlocks, PackedData

# What one `data.mix` entry may set; the rest (seq_len, tokenizer, chat settings...) is shared from data.*.
MIX_KEYS = ("name", "files", "hub_name", "hub_config", "hub_split", "text_field", "messages_field", "weight", "format",
            "max_tokens")
CHUNK = 1024  # positions per quota chunk: weights are honoured to 1/CHUNK within every chunk
_MASK64 = (1 << 64) - 1


def quotas(weights: list[float], chunk: int = CHUNK) -> np.ndarray:
    """Samples of each source per chunk: `weight / sum * chunk` rounded by largest remainder, each >= 1."""
    w = np.asarray(weights, np.float64)
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"mixture weights must be finite and > 0, got {list(weights)}")
    exact = w / w.sum() * chunk
    q = np.maximum(1, np.floor(exact).astype(np.int64))
    while q.sum() < chunk:
        q[int(np.argmax(exact - q))] += 1
    while q.sum() > chunk:
        q[int(np.argmax(np.where(q > 1, q - exact, -np.inf)))] -= 1
    return q


class MixtureOrder:
    """The infinite sample order of a mixture over a concatenated block store (module docstring)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int = 0, shuffle: bool = True) -> None:
        if any(n <= 0 for n in sizes):
            raise ValueError(f"every mixed source needs training blocks, got block counts {sizes}")
        self.sizes = np.asarray(sizes, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.quota = quotas(weights)
        self.seed, self.shuffle = int(seed), shuffle
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position of chunk `c`, its rank among that source's positions in the chunk)."""
        hit = self._chunks.get(c)
        if hit is None:
            src = np.repeat(np.arange(len(self.quota)), self.quota)
            if self.shuffle:
                src = np.random.default_rng([self.seed & _MASK64, 1, c]).permutation(src)
            rank = np.empty_like(src)
            for s in range(len(self.quota)):
                where = np.flatnonzero(src == s)
                rank[where] = np.arange(where.size)
            self._chunks = {k: v for k, v in self._chunks.items() if k == c - 1}
            hit = self._chunks[c] = (src, rank)
        return hit

    def _perm(self, s: int, epoch: int) -> np.ndarray:
        perm = self._perms.get((s, epoch))
        if perm is None:
            n = int(self.sizes[s])
            perm = (np.random.default_rng([self.seed & _MASK64, 2, s, epoch]).permutation(n) if self.shuffle
                    else np.arange(n))
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            self._perms[(s, epoch)] = perm
        return perm

    def counts_before(self, position: int) -> np.ndarray:
        """Samples of each source at global positions [0, position)."""
        c, o = divmod(int(position), CHUNK)
        return c * self.quota + np.bincount(self._chunk(c)[0][:o], minlength=len(self.quota))

    def indices(self, start: int, count: int) -> np.ndarray:
        """Concatenated-store block indices at global positions [start, start + count)."""
        out = np.empty(count, np.int64)
        for j, p in enumerate(range(start, start + count)):
            c, o = divmod(p, CHUNK)
            src, rank = self._chunk(c)
            s = int(src[o])
            epoch, k = divmod(c * int(self.quota[s]) + int(rank[o]), int(self.sizes[s]))
            out[j] = self.offsets[s] + self._perm(s, epoch)[k]
        return out


def mix_entry(data: Any, i: int) -> dict[str, Any]:
    """`data.mix[i]` with data.*'s values for what it does not set, and its name (default: source<i>)."""
    base = {k: data[k] for k in ("hub_config", "hub_split", "text_field", "messages_field", "format", "max_tokens")}
    return {**base, "files": [], "hub_name": None, "name": f"source{i}", "weight": 1.0, **dict(data.mix[i])}


@dataclass(frozen=True)
class MixSource:
    """One source of a mixture as it ends up in the store: its blocks' ranges `[start, stop)` per split."""

    name: str
    weight: float
    train: tuple[int, int]
    val: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "train": list(self.train), "val": list(self.val)}


def mix_sources(meta: dict[str, Any]) -> list[MixSource]:
    """The sources of mixed data (from its meta), or [] for a single source."""
    return [MixSource(m["name"], float(m["weight"]), tuple(m["train"]), tuple(m["val"])) for m in meta.get("mix", [])]


def _concat(parts: list[PackedBlocks], seq_len: int) -> dict[str, np.ndarray]:
    dtype = np.result_type(*[p.array.dtype for p in parts])
    arrays = {"tokens": np.concatenate([np.asarray(p.array, dtype) for p in parts]).reshape(-1, seq_len)}
    if any(p.label_mask is not None for p in parts):
        arrays["mask"] = np.concatenate([np.ones(p.array.shape, bool) if p.label_mask is None
                                         else np.asarray(p.label_mask, bool) for p in parts]).reshape(-1, seq_len)
    if any(p.positions is not None for p in parts):
        if not all(p.positions is not None for p in parts):
            raise ValueError("mixed sources must share one packing (all per_document or all stream)")
        arrays["pos"] = np.concatenate([np.asarray(p.positions) for p in parts]).reshape(-1, seq_len)
    return arrays


def mix_packed_data(parts: list[PackedData], names: list[str], weights: list[float],
                    cache_dir: str | None = None) -> PackedData:
    """One PackedData holding every source's blocks (source after source) and, in `meta["mix"]`, which blocks
    are whose; the training loader samples it by `weights` (MixtureOrder). Cached under `cache_dir` by the
    sources' fingerprints."""
    quotas(weights)  # checks them
    seq_lens = {p.train.seq_len for p in parts}
    if len(seq_lens) != 1:
        raise ValueError(f"mixed sources have different block lengths {sorted(seq_lens)}")
    seq_len = seq_lens.pop()
    fp = cache.fingerprint({"mix": [[p.fingerprint, n] for p, n in zip(parts, names, strict=True)]})
    entry = os.path.join(cache_dir, fp) if cache_dir is not None else None
    hit = cache.load_entry(entry) if entry is not None else None
    if hit is None:
        arrays: dict[str, np.ndarray] = {}
        for split in ("train", "val"):
            arrays.update({split if k == "tokens" else f"{split}_{k}": v
                           for k, v in _concat([getattr(p, split) for p in parts], seq_len).items()})
        meta = {"sources": [{"name": n, **p.meta} for p, n in zip(parts, names, strict=True)], "seq_len": seq_len}
        if entry is not None:
            cache.save_entry(entry, arrays, meta)
            arrays, meta = cache.load_entry(entry)
    else:
        arrays, meta = hit
    spans, t0, v0 = [], 0, 0
    for p, n, w in zip(parts, names, weights, strict=True):
        spans.append(MixSource(n, float(w), (t0, t0 + len(p.train)), (v0, v0 + len(p.val))).to_dict())
        t0, v0 = t0 + len(p.train), v0 + len(p.val)
    meta = {**meta, "mix": spans}

    def blocks(split: str) -> PackedBlocks:
        return PackedBlocks(arrays[split], label_mask=arrays.get(f"{split}_mask"), positions=arrays.get(f"{split}_pos"))

    mixed_fp = cache.fingerprint({"mix": fp, "weights": [float(w) for w in weights]})
    return PackedData(blocks("train"), blocks("val"), mixed_fp, meta)
