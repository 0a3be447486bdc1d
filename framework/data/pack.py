"""Tokenize documents, split them into train/val, and pack each split into fixed-length blocks.

Stream definition: every document is tokenized without special tokens and followed by one EOS
token (a chat conversation, ``format="chat"``, is rendered by its chat template instead, which ends
each turn itself); the documents of a split are concatenated in document order and cut into blocks
of exactly ``seq_len`` tokens; only the final partial block is dropped.

``packing="per_document"`` instead places whole documents in blocks (one that does not fit in what is
left of a block starts the next, the rest padded; one longer than ``seq_len`` is cut into pieces),
with position ids restarting at each document, so attention and the loss stay within a document:
a document's first token is no label (it has no context of its own) and neither is padding.

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
from sapling.data.chat import ChatFormat, read_chat_rows, tokenize_conversations
from sapling.data.sources import check_files, load_documents, open_hub_stream
from sapling.data.split import split_documents
from sapling.errors import DataError, short

logger = logging.getLogger(__name__)

CHUNK_DOCS = 20_000  # documents tokenized per `Dataset.map` call (bounds work past `max_tokens`)
TOKENIZE_BATCH = 1_000  # documents per tokenizer call
_TOKEN_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})

# (flat token ids of some consecutive documents, token count of each of those documents,
#  flat label flags or None: every token is a label)
Batch = tuple[np.ndarray, np.ndarray, np.ndarray | None]
FORMATS = ("text", "chat")
PACKINGS = ("stream", "per_document")


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
        yield ids.flatten().to_numpy(), pc.list_value_length(ids).to_numpy(), None


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
        yield np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=int(lengths.sum())), lengths, None


def _hub_chat_rows(hub_name: str, hub_config: str | None, hub_split: str) -> Iterator[tuple[str, Any]]:
    ds = datasets.load_dataset(hub_name, hub_config, split=hub_split, streaming=True)
    for i, row in enumerate(ds):
        yield f"hub dataset {short(hub_name)} row {i}", row


def _file_chat_rows(paths: list[str], field: str) -> Iterator[tuple[str, Any]]:
    for path in paths:
        yield from read_chat_rows(path, field)


def _collect(
    batches: Iterator[Batch], max_tokens: int | None, dtype: np.dtype, vocab_size: int
) -> list[Batch]:
    """Materialize batches as ``dtype`` arrays, stopping at the document that reaches ``max_tokens``."""
    kept: list[Batch] = []
    total = 0
    for flat, lengths, labels in batches:
        if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
            raise DataError(f"tokenizer produced ids outside [0, {vocab_size}) (len(tokenizer)={vocab_size}); "
                            "fix: use a tokenizer whose ids are below its length (data.tokenizer)")
        lengths = lengths.astype(np.int64)
        done = max_tokens is not None and total + flat.size >= max_tokens
        if done:
            ends = np.cumsum(lengths)
            k = int(np.searchsorted(ends, max_tokens - total)) + 1  # docs up to the one reaching the cap
            flat, lengths = flat[: ends[k - 1]], lengths[:k]
            labels = None if labels is None else labels[: ends[k - 1]]
        kept.append((flat.astype(dtype), lengths, labels))
        total += flat.size
        if done:
            break
    return kept


def _split_streams(kept: list[Batch], is_val: np.ndarray, dtype: np.dtype) -> dict[bool, Batch]:
    """Concatenate the documents of each split (document order) into one token stream per split:
    {is_val: (stream, document lengths, label flags or None)}."""
    lengths = np.concatenate([lens for _, lens, _ in kept]) if kept else np.zeros(0, np.int64)
    labelled = any(lab is not None for _, _, lab in kept)
    out: dict[bool, Batch] = {}
    for split in (False, True):
        n = int(lengths[is_val == split].sum())
        out[split] = (np.empty(n, dtype), lengths[is_val == split], np.empty(n, bool) if labelled else None)
    pos = {False: 0, True: 0}
    doc = 0
    pending = deque(kept)
    kept.clear()
    while pending:
        flat, lens, labels = pending.popleft()  # release each batch once copied
        tok_is_val = np.repeat(is_val[doc : doc + len(lens)], lens)
        for split in (False, True):
            part = flat[tok_is_val == split]
            stream, _, flags = out[split]
            stream[pos[split] : pos[split] + part.size] = part
            if flags is not None:
                flags[pos[split] : pos[split] + part.size] = True if labels is None else labels[tok_is_val == split]
            pos[split] += part.size
        doc += len(lens)
    return out


def pack_documents(stream: np.ndarray, lengths: np.ndarray, labels: np.ndarray | None, seq_len: int,
                   pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Whole documents into ``[n, seq_len]`` blocks (module docstring): (tokens, label flags, position ids, the
    number of documents longer than ``seq_len`` that were cut into pieces)."""
    lengths = np.asarray(lengths, np.int64)
    lengths = lengths[lengths > 0]
    pieces_per_doc = -(-lengths // seq_len)
    doc_start = np.cumsum(lengths) - lengths
    first = np.repeat(np.cumsum(pieces_per_doc) - pieces_per_doc, pieces_per_doc)
    within = np.arange(int(pieces_per_doc.sum())) - first  # piece number within its document
    piece_start = np.repeat(doc_start, pieces_per_doc) + within * seq_len
    piece_len = np.minimum(seq_len, np.repeat(lengths, pieces_per_doc) - within * seq_len)
    dest = np.empty(piece_len.size, np.int64)  # where each piece starts in the flattened blocks
    block = used = 0
    for i, n in enumerate(piece_len.tolist()):  # greedy: in order, a piece that does not fit opens a block
        if used + n > seq_len:
            block, used = block + 1, 0
        dest[i] = block * seq_len + used
        used += n
    num_blocks = block + 1 if piece_len.size else 0
    total = int(piece_len.sum())
    tokens = np.full(num_blocks * seq_len, pad_id, stream.dtype)
    flags = np.zeros(num_blocks * seq_len, bool)
    positions = np.tile(np.arange(seq_len, dtype=np.uint16 if seq_len <= 2**16 else np.int32), num_blocks)
    where = np.repeat(dest - piece_start, piece_len) + np.arange(total)
    tokens[where] = stream[:total]
    flags[where] = True if labels is None else labels[:total]
    flags[dest] = False  # a piece's first token: its context is in another document (or piece)
    positions[where] = np.arange(total) - np.repeat(piece_start, piece_len)
    shape = (num_blocks, seq_len)
    return tokens.reshape(shape), flags.reshape(shape), positions.reshape(shape), int((pieces_per_doc > 1).sum())


@contextlib.contextmanager
def _hf_cache(cache_dir: str | None) -> Iterator[str]:
    """Where `datasets` may write its Arrow files: under cache_dir, else a directory deleted afterwards."""
    if cache_dir is not None:
        yield os.path.join(cache_dir, "hf_datasets")
    else:
        with tempfile.TemporaryDirectory(prefix="sapling-data-") as tmp:
            yield tmp


def _blocks_or_raise(n: int, stream_size: int, seq_len: int, split: str) -> None:
    if n == 0:
        hint = (
            "add data, raise data.max_tokens or lower data.seq_len"
            if split == "train"
            else "raise data.val_fraction or lower data.seq_len"
        )
        raise DataError(f"{split} split has {stream_size} tokens, fewer than one block of seq_len={seq_len}; "
                        f"fix: {hint}")


def _pack_split(split: Batch, seq_len: int, packing: str, pad_id: int, name: str,
                required: bool = True) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """One split's arrays (`name`, and `name`_mask / `name`_pos when there are label flags / per-document
    positions) and its counts."""
    stream, lengths, labels = split
    if packing == "per_document":
        tokens, flags, positions, cut = pack_documents(stream, lengths, labels, seq_len, pad_id)
        if required:
            _blocks_or_raise(len(tokens), stream.size, seq_len, name)
        arrays = {name: tokens, f"{name}_mask": flags, f"{name}_pos": positions}
        counts = {"label_tokens": int(flags.sum()), "pad_tokens": int(tokens.size - stream.size), "cut_docs": cut}
        return arrays, counts
    n = stream.size // seq_len if required or stream.size else 0
    if required:
        _blocks_or_raise(n, stream.size, seq_len, name)
    arrays = {name: stream[: n * seq_len].reshape(n, seq_len)}
    if labels is None:
        return arrays, {"label_tokens": n * seq_len}
    arrays[f"{name}_mask"] = labels[: n * seq_len].reshape(n, seq_len)
    return arrays, {"label_tokens": int(arrays[f"{name}_mask"].sum())}


def _as_packed(arrays: dict[str, np.ndarray], fp: str, meta: dict[str, Any]) -> PackedData:
    def blocks(name: str) -> PackedBlocks:
        return PackedBlocks(arrays[name], label_mask=arrays.get(f"{name}_mask"), positions=arrays.get(f"{name}_pos"))

    return PackedData(blocks("train"), blocks("val"), fp, meta)


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
    format: str = "text",
    packing: str | None = None,
    chat: ChatFormat | None = None,
) -> PackedData:
    """Tokenize, split (per document) and pack a corpus into train/val blocks of ``seq_len`` tokens.

    Sources are local ``files`` (.jsonl/.json = one document per line, .parquet = one per row, with
    ``text_field`` naming the text column; any other UTF-8 text file, .txt, .py, .md..., = one
    document) or a hub dataset streamed with
    ``datasets.load_dataset(hub_name, hub_config, split=hub_split, streaming=True)`` (then
    ``max_tokens`` should be set, or the whole split is streamed). Document ``i`` goes to validation
    per ``split_documents``; a single document with ``val_fraction > 0`` is an error.

    ``format="chat"``: every row (.jsonl/.json/.parquet, or a hub row) is a conversation read and labelled
    per ``chat`` (sapling.data.chat: the loss only on the assistant's tokens by default). ``packing``:
    "stream" or "per_document" (module docstring); None picks per_document for chat, stream for text.

    With ``cache_dir``, results are stored in ``cache_dir/<fingerprint>/`` and re-used (memory-mapped)
    by later calls with identical inputs; `datasets`' own Arrow files go to ``cache_dir/hf_datasets``.
    Without it they go to a temporary directory and the result lives in memory.
    """
    _validate(files, hub_name, seq_len, val_fraction, max_tokens, num_proc)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    packing = packing or ("per_document" if format == "chat" else "stream")
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
    chat = chat or ChatFormat()
    seq_len, val_fraction, seed = int(seq_len), float(val_fraction), int(seed)  # plain (JSON-able) numbers
    max_tokens = None if max_tokens is None else int(max_tokens)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos_token (appended after every document); "
                        "fix: use a tokenizer that defines one (data.tokenizer)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
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
    if format == "chat":  # (text data keeps the fingerprints it had before chat data existed)
        tokens_key.update(format="chat", chat=chat.key())
    layout = {"packing": packing, "pad_id": pad_id} if packing != "stream" else {}
    fp = cache.fingerprint(
        {
            **tokens_key,
            **layout,
            "seq_len": seq_len,
            "val_fraction": val_fraction,
            "seed": seed,
            "max_tokens": max_tokens,
        }
    )
    entry = os.path.join(cache_dir, fp) if cache_dir is not None else None
    if entry is not None and (hit := cache.load_entry(entry)) is not None:
        logger.info("packed data cache hit: %s", entry)
        return _as_packed(*hit[:1], fp, hit[1])

    with _hf_cache(cache_dir) as hf_dir:
        if format == "chat":
            rows = _file_chat_rows(paths, chat.messages_field) if files is not None else \
                _hub_chat_rows(hub_name, hub_config, hub_split)
            batches: Iterator[Batch] = tokenize_conversations(rows, tokenizer, chat)
        elif files is not None:
            tokenize = _Tokenize(tokenizer, eos_id, "text", "data files")
            docs = load_documents(paths, text_field, hf_dir, num_proc)
            batches = _file_batches(docs, tokenize, cache.fingerprint(tokens_key), num_proc)
        else:
            tokenize = _Tokenize(tokenizer, eos_id, text_field, f"hub dataset {hub_name!r}")
            batches = _hub_batches(open_hub_stream(hub_name, hub_config, hub_split, text_field), tokenize)
        kept = _collect(batches, max_tokens, dtype, vocab_size)

    num_docs = sum(len(lens) for _, lens, _ in kept)
    what = f"data files {short(files, 200)}" if files is not None else f"hub dataset {short(hub_name)}"
    if num_docs == 0:
        raise DataError(f"empty corpus: no documents in {what}; fix: pass data that holds text")
    if val_fraction > 0 and num_docs < 2:
        raise DataError(f"{what} give 1 document, which cannot be split into train and val (each text file is "
                        "one document, as is each .jsonl line or Parquet row); fix: give at least 2 documents "
                        "or set data.val_fraction=0")
    is_val = split_documents(num_docs, val_fraction, seed)
    splits = _split_streams(kept, is_val, dtype)
    if format == "chat" and not splits[False][2].any():
        raise DataError(f"{what}: no conversation has an assistant turn to learn from (data.loss_on=assistant); "
                        "fix: give conversations with assistant replies, or set data.loss_on=all")
    arrays, train_counts = _pack_split(splits[False], seq_len, packing, pad_id, "train")
    val_arrays, val_counts = _pack_split(splits[True], seq_len, packing, pad_id, "val", required=val_fraction > 0)
    arrays.update(val_arrays)
    meta = {
        "num_docs": num_docs,
        "num_val_docs": int(is_val.sum()),
        "train_stream_tokens": int(splits[False][0].size),
        "val_stream_tokens": int(splits[True][0].size),
        "seq_len": seq_len,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "format": format,
        "packing": packing,
        **{f"train_{k}": v for k, v in train_counts.items()},
        **{f"val_{k}": v for k, v in val_counts.items()},
    }
    if meta.get("train_cut_docs"):
        logger.warning("%d of %d training documents are longer than data.seq_len=%d and were cut into pieces (each "
                       "piece sees only its own tokens); raise data.seq_len to keep them whole",
                       meta["train_cut_docs"], num_docs - meta["num_val_docs"], seq_len)
    if entry is not None:
        cache.save_entry(entry, arrays, meta)
        arrays, meta = cache.load_entry(entry)
        logger.info("packed data cached: %s", entry)
    return _as_packed(arrays, fp, meta)
