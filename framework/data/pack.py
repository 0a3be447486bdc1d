"""Tokenize documents, split them into train/val, and pack each split into fixed-length blocks.

Stream definition: every document is tokenized without special tokens and followed by one EOS
token; the documents of a split are concatenated in document order and cut into blocks of exactly
``seq_len`` tokens; only the final partial block is dropped.

``max_tokens`` keeps the shortest prefix of documents (in document order, both splits together,
EOS included) whose token count reaches ``max_tokens``: the document that crosses the limit is kept
whole and nothing after it is tokenized.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import deque
from collections.abc import Iterator
from itertools import chain
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sapling.data import cache
from sapling.data.blocks import PackedBlocks, PackedData
from sapling.data.sources import check_files, load_documents, open_hub_stream
from sapling.data.split import split_documents
from sapling.errors import DataError, short

logger = logging.getLogger(__name__)

CHUNK_DOCS = 20_000  # documents tokenized per `Dataset.map` call (bounds work past `max_tokens`)
TOKENIZE_BATCH = 1_000  # documents per tokenizer call
_TOKEN_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})

# (flat token ids of some consecutive documents, token count of each of those documents)
Batch = tuple[np.ndarray, np.ndarray]


class _Tokenize:
    """Batched map function: texts -> token ids without special tokens, EOS appended to each doc."""

    def __init__(self, tokenizer: Any, eos_id: int, field: str, where: str) -> None:
        self.tokenizer, self.eos_id, self.field, self.where = tokenizer, eos_id, field, where

    def __call__(self, batch: dict[str, list]) -> dict[str, list[list[int]]]:
        if self.field not in batch:
            raise DataError(f"{self.where}: text field {self.field!r} not found (columns: {short(list(batch))}); "
                            "fix: set data.text_field to the column that holds the text")
        texts = list(batch[self.field])
        if not all(isinstance(t, str) for t in texts):
            raise DataError(f"{self.where}: text field {self.field!r} has a missing or non-string value; "
                            "fix: give every row a string (or drop those rows)")
        enc = self.tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        return {"input_ids": [ids + [self.eos_id] for ids in enc["input_ids"]]}


def _validate(files, hub_name, seq_len, val_fraction, max_tokens, num_proc) -> None:
    if (files is None) == (hub_name is None):
        raise ValueError("give exactly one of files (local data files) or hub_name (a hub dataset)")
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0 or None, got {max_tokens!r}")
    if num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc!r}")


def _arrow_batches(table_iter: Iterator[pa.Table]) -> Iterator[Batch]:
    for table in table_iter:
        ids = table.column("input_ids").combine_chunks()
        yield ids.flatten().to_numpy(), pc.list_value_length(ids).to_numpy()


def _file_batches(docs: datasets.Dataset, tokenize: _Tokenize, tok_fp: str, num_proc: int) -> Iterator[Batch]:
    """Tokenize ``docs`` chunk by chunk (lazily, so ``max_tokens`` can stop early).

    ``tok_fp`` identifies (files, tokenizer) only, so `datasets`' map cache is re-used when only
    seq_len / split / seed change.
    """
    for start in range(0, len(docs), CHUNK_DOCS):
        end = min(start + CHUNK_DOCS, len(docs))
        chunk = docs.select(range(start, end))
        tokenized = chunk.map(
            tokenize,
            batched=True,
            batch_size=TOKENIZE_BATCH,
            remove_columns=chunk.column_names,
            features=_TOKEN_FEATURES,
            num_proc=num_proc if num_proc > 1 else None,
            new_fingerprint=f"sapling-tok-{tok_fp[:32]}-{start}-{end}",
            desc="Tokenizing",
        )
        yield from _arrow_batches(tokenized.with_format("arrow").iter(batch_size=TOKENIZE_BATCH))


def _hub_batches(ds: datasets.IterableDataset, tokenize: _Tokenize) -> Iterator[Batch]:
    tokenized = ds.map(tokenize, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=ds.column_names)
    for batch in tokenized.iter(batch_size=TOKENIZE_BATCH):
        docs = batch["input_ids"]
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        yield np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=int(lengths.sum())), lengths


def _collect(
    batches: Iterator[Batch], max_tokens: int | None, dtype: np.dtype, vocab_size: int
) -> list[Batch]:
    """Materialize batches as ``dtype`` arrays, stopping at the document that reaches ``max_tokens``."""
    kept: list[Batch] = []
    total = 0
    for flat, lengths in batches:
        if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
            raise DataError(f"tokenizer produced ids outside [0, {vocab_size}) (len(tokenizer)={vocab_size}); "
                            "fix: use a tokenizer whose ids are below its length (data.tokenizer)")
        lengths = lengths.astype(np.int64)
        done = max_tokens is not None and total + flat.size >= max_tokens
        if done:
            ends = np.cumsum(lengths)
            k = int(np.searchsorted(ends, max_tokens - total)) + 1  # docs up to the one reaching the cap
            flat, lengths = flat[: ends[k - 1]], lengths[:k]
        kept.append((flat.astype(dtype), lengths))
        total += flat.size
        if done:
            break
    return kept


def _split_streams(kept: list[Batch], is_val: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the documents of each split (document order) into one token stream per split."""
    lengths = np.concatenate([lens for _, lens in kept]) if kept else np.zeros(0, np.int64)
    streams = {
        False: np.empty(int(lengths[~is_val].sum()), dtype),
        True: np.empty(int(lengths[is_val].sum()), dtype),
    }
    pos = {False: 0, True: 0}
    doc = 0
    pending = deque(kept)
    kept.clear()
    while pending:
        flat, lens = pending.popleft()  # release each batch once copied
        tok_is_val = np.repeat(is_val[doc : doc + len(lens)], lens)
        for split in (False, True):
            part = flat[tok_is_val == split]
            streams[split][pos[split] : pos[split] + part.size] = part
            pos[split] += part.size
        doc += len(lens)
    return streams[False], streams[True]


@contextlib.contextmanager
def _hf_cache(cache_dir: str | None) -> Iterator[str]:
    """Where `datasets` may write its Arrow files: under cache_dir, else a directory deleted afterwards."""
    if cache_dir is not None:
        yield os.path.join(cache_dir, "hf_datasets")
    else:
        with tempfile.TemporaryDirectory(prefix="sapling-data-") as tmp:
            yield tmp


def _blocks_or_raise(stream: np.ndarray, seq_len: int, split: str) -> np.ndarray:
    n = stream.size // seq_len
    if n == 0:
        hint = (
            "add data, raise data.max_tokens or lower data.seq_len"
            if split == "train"
            else "raise data.val_fraction or lower data.seq_len"
        )
        raise DataError(f"{split} split has {stream.size} tokens, fewer than one block of seq_len={seq_len}; "
                        f"fix: {hint}")
    return stream[: n * seq_len].reshape(n, seq_len)


def build_packed_data(
    files: list[str] | None,
    tokenizer: Any,
    seq_len: int,
    *,
    hub_name: str | None = None,
    hub_config: str | None = None,
    hub_split: str = "train",
    text_field: str = "text",
    val_fraction: float = 0.05,
    seed: int = 0,
    max_tokens: int | None = None,
    cache_dir: str | None = None,
    num_proc: int = 1,
) -> PackedData:
    """Tokenize, split (per document) and pack a corpus into train/val blocks of ``seq_len`` tokens.

    Sources are local ``files`` (.jsonl/.json = one document per line, .parquet = one per row, with
    ``text_field`` naming the text column; any other UTF-8 text file, .txt, .py, .md..., = one
    document) or a hub dataset streamed with
    ``datasets.load_dataset(hub_name, hub_config, split=hub_split, streaming=True)`` (then
    ``max_tokens`` should be set, or the whole split is streamed). Document ``i`` goes to validation
    per ``split_documents``; a single document with ``val_fraction > 0`` is an error.

    With ``cache_dir``, results are stored in ``cache_dir/<fingerprint>/`` and re-used (memory-mapped)
    by later calls with identical inputs; `datasets`' own Arrow files go to ``cache_dir/hf_datasets``.
    Without it they go to a temporary directory and the result lives in memory.
    """
    _validate(files, hub_name, seq_len, val_fraction, max_tokens, num_proc)
    seq_len, val_fraction, seed = int(seq_len), float(val_fraction), int(seed)  # plain (JSON-able) numbers
    max_tokens = None if max_tokens is None else int(max_tokens)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos_token (appended after every document); "
                        "fix: use a tokenizer that defines one (data.tokenizer)")
    vocab_size = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)

    if files is not None:
        paths = check_files(list(files))
        source: Any = [cache.file_signature(p) for p in paths]
    else:
        source = {"hub_name": hub_name, "hub_config": hub_config, "hub_split": hub_split}
    tokens_key = {
        "source": source,
        "text_field": text_field,
        "tokenizer": cache.tokenizer_hash(tokenizer),
        "vocab_size": vocab_size,
        "eos_id": eos_id,
    }
    fp = cache.fingerprint(
        {
            **tokens_key,
            "seq_len": seq_len,
            "val_fraction": val_fraction,
            "seed": seed,
            "max_tokens": max_tokens,
        }
    )
    entry = os.path.join(cache_dir, fp) if cache_dir is not None else None
    if entry is not None and (hit := cache.load_entry(entry)) is not None:
        logger.info("packed data cache hit: %s", entry)
        train, val, meta = hit
        return PackedData(PackedBlocks(train), PackedBlocks(val), fp, meta)

    if files is not None:
        tokenize = _Tokenize(tokenizer, eos_id, "text", "data files")
    else:
        tokenize = _Tokenize(tokenizer, eos_id, text_field, f"hub dataset {hub_name!r}")
    with _hf_cache(cache_dir) as hf_dir:
        if files is not None:
            docs = load_documents(paths, text_field, hf_dir, num_proc)
            batches = _file_batches(docs, tokenize, cache.fingerprint(tokens_key), num_proc)
        else:
            batches = _hub_batches(open_hub_stream(hub_name, hub_config, hub_split, text_field), tokenize)
        kept = _collect(batches, max_tokens, dtype, vocab_size)

    num_docs = sum(len(lens) for _, lens in kept)
    what = f"data files {short(files, 200)}" if files is not None else f"hub dataset {short(hub_name)}"
    if num_docs == 0:
        raise DataError(f"empty corpus: no documents in {what}; fix: pass data that holds text")
    if val_fraction > 0 and num_docs < 2:
        raise DataError(f"{what} give 1 document, which cannot be split into train and val (each text file is "
                        "one document, as is each .jsonl line or Parquet row); fix: give at least 2 documents "
                        "or set data.val_fraction=0")
    is_val = split_documents(num_docs, val_fraction, seed)
    train_stream, val_stream = _split_streams(kept, is_val, dtype)
    train = _blocks_or_raise(train_stream, seq_len, "train")
    val = (
        _blocks_or_raise(val_stream, seq_len, "val")
        if val_fraction > 0
        else val_stream[:0].reshape(0, seq_len)
    )
    meta = {
        "num_docs": num_docs,
        "num_val_docs": int(is_val.sum()),
        "train_stream_tokens": int(train_stream.size),
        "val_stream_tokens": int(val_stream.size),
        "seq_len": seq_len,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
    }
    if entry is not None:
        cache.save_entry(entry, train, val, meta)
        train, val, meta = cache.load_entry(entry)
        logger.info("packed data cached: %s", entry)
    return PackedData(PackedBlocks(train), PackedBlocks(val), fp, meta)
