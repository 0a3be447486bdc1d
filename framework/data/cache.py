"""Fingerprinting of packing inputs and the on-disk cache of packed arrays.

Layout: ``<cache_dir>/<fingerprint>/{train.npy,val.npy,[train_mask.npy...],meta.json}``. Every file is written to a
temporary name and moved into place with ``os.replace``, so readers never see a partial file; an
entry counts as present only when meta.json and every array it lists exist. Arrays are re-opened memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from sapling.io import write_atomically, write_text_atomically

CACHE_FORMAT_VERSION = 1
_FILES = ("train.npy", "val.npy", "meta.json")


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's serialization (vocab, merges, normalizer...), else of its vocab."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_signature(path: str) -> dict[str, Any]:
    """Path, size and modification time of a data file (changes whenever the file is rewritten)."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(payload: dict[str, Any]) -> str:
    """sha256 hex digest of a JSON-serializable description of all inputs."""
    blob = json.dumps({"version": CACHE_FORMAT_VERSION, **payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def save_entry(entry_dir: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Atomically write one cache entry: ``<name>.npy`` per array (``train`` and ``val`` at least, the label masks
    and position ids of chat / per-document data beside them), meta.json (listing them) last."""
    os.makedirs(entry_dir, exist_ok=True)
    for name, array in arrays.items():
        write_atomically(os.path.join(entry_dir, f"{name}.npy"), lambda f, a=array: np.save(f, a))
    meta = {**meta, "arrays": sorted(arrays)}
    write_text_atomically(os.path.join(entry_dir, "meta.json"), json.dumps(meta, indent=2, sort_keys=True))


def load_entry(entry_dir: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Return the memory-mapped arrays (by name) and the meta of a complete cache entry, or None when absent."""
    if not all(os.path.isfile(os.path.join(entry_dir, name)) for name in _FILES):
        return None
    with open(os.path.join(entry_dir, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    names = meta.get("arrays", ["train", "val"])
    if not all(os.path.isfile(os.path.join(entry_dir, f"{name}.npy")) for name in names):
        return None
    return {name: np.load(os.path.join(entry_dir, f"{name}.npy"), mmap_mode="r") for name in names}, meta
