"""Sources -> tokenize -> document split -> pack -> cache."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from collections import Counter

import datasets
import numpy as np
import pytest
import torch

from sapling.data import (
    PackedBlocks,
    build_packed_data,
    split_documents,
    unigram_cross_entropy,
)

MARKER = re.compile(r"@@doc(\d{3})@@")


def encode(tokenizer, doc: str) -> list[int]:
    """Reference tokenization of one document: no special tokens, EOS appended."""
    return tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def stream(blocks: PackedBlocks) -> np.ndarray:
    return np.asarray(blocks.array, dtype=np.int64).reshape(-1)


def expected_streams(tokenizer, docs: list[str], is_val: np.ndarray) -> tuple[list[int], list[int]]:
    train, val = [], []
    for doc, v in zip(docs, is_val):
        (val if v else train).extend(encode(tokenizer, doc))
    return train, val


def assert_packed(blocks: PackedBlocks, expected: list[int], seq_len: int) -> None:
    """Blocks + the dropped remainder (< seq_len tokens) == expected stream."""
    got = stream(blocks)
    assert len(blocks) == len(expected) // seq_len
    assert all(blocks[i].shape == (seq_len,) and blocks[i].dtype == torch.long for i in range(len(blocks)))
    assert got.tolist() == expected[: len(got)]
    assert 0 <= len(expected) - len(got) < seq_len


@pytest.mark.parametrize("seq_len", [7, 32])
def test_packing_is_exact_and_split_by_document(tiny_tokenizer, docs, write_corpus, seq_len):
    tok = tiny_tokenizer
    data = build_packed_data(write_corpus("jsonl", docs), tok, seq_len, val_fraction=0.25, seed=3)
    is_val = split_documents(len(docs), 0.25, 3)
    assert 0 < is_val.sum() < len(docs)
    assert data.meta["num_docs"] == len(docs) and data.meta["num_val_docs"] == int(is_val.sum())
    exp_train, exp_val = expected_streams(tok, docs, is_val)
    assert_packed(data.train, exp_train, seq_len)
    assert_packed(data.val, exp_val, seq_len)
    assert data.train.num_tokens == len(data.train) * seq_len

    # EOS sits exactly at the end of each train document that fits in the packed stream
    ends = np.cumsum([len(encode(tok, d)) for d, v in zip(docs, is_val) if not v]) - 1
    got = stream(data.train)
    eos_pos = np.flatnonzero(got == tok.eos_token_id)
    assert eos_pos.tolist() == [e for e in ends if e < len(got)]

    # bookkeeping by marker: no val document leaks into train and vice versa
    train_marks = {int(m) for m in MARKER.findall(tok.decode(got.tolist()))}
    val_marks = {int(m) for m in MARKER.findall(tok.decode(stream(data.val).tolist()))}
    assert train_marks and val_marks and not train_marks & val_marks
    assert train_marks <= set(np.flatnonzero(~is_val).tolist())
    assert val_marks <= set(np.flatnonzero(is_val).tolist())


def test_txt_jsonl_parquet_and_mixed_give_same_stream(tiny_tokenizer, docs, write_corpus):
    def build(files):
        return build_packed_data(files, tiny_tokenizer, 16, val_fraction=0.2, seed=1)

    ref = build(write_corpus("txt", docs))
    empty = write_corpus("jsonl", []) + write_corpus("parquet", [])  # files without documents are skipped
    mixed = (
        write_corpus("txt", docs[:7])
        + write_corpus("parquet", docs[7:15])
        + empty
        + write_corpus("jsonl", docs[15:])
    )
    variants = {
        "jsonl": write_corpus("jsonl", docs[:10]) + write_corpus("jsonl", docs[10:]),
        "parquet": write_corpus("parquet", docs),
        "mixed": mixed,
        "other_field": write_corpus("jsonl", docs, field="body"),
    }
    for name, files in variants.items():
        kw = {"text_field": "body"} if name == "other_field" else {}
        data = build_packed_data(files, tiny_tokenizer, 16, val_fraction=0.2, seed=1, **kw)
        assert np.array_equal(data.train.array, ref.train.array), name
        assert np.array_equal(data.val.array, ref.val.array), name
        assert data.fingerprint != ref.fingerprint


def test_split_documents_is_deterministic_and_guarantees_both_splits():
    a, b = split_documents(1000, 0.1, seed=0), split_documents(1000, 0.1, seed=0)
    assert np.array_equal(a, b) and 50 < a.sum() < 150
    assert not np.array_equal(a, split_documents(1000, 0.1, seed=1))
    assert np.array_equal(split_documents(2000, 0.1, seed=0)[:1000], a)  # appending docs moves none
    assert split_documents(5, 1e-12, seed=0).sum() == 1
    assert split_documents(5, 1 - 1e-12, seed=0).sum() == 4
    assert split_documents(1, 0.0, seed=0).tolist() == [False]
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(1, 0.5, seed=0)


def test_build_is_deterministic_and_seeded(tiny_tokenizer, docs, write_corpus):
    files = write_corpus("jsonl", docs)
    a = build_packed_data(files, tiny_tokenizer, 16, val_fraction=0.3, seed=0)
    b = build_packed_data(files, tiny_tokenizer, 16, val_fraction=0.3, seed=0)
    c = build_packed_data(files, tiny_tokenizer, 16, val_fraction=0.3, seed=5)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert np.array_equal(a.train.array, b.train.array) and np.array_equal(a.val.array, b.val.array)
    assert a.train.array.dtype == np.uint16
    assert not np.array_equal(split_documents(len(docs), 0.3, 0), split_documents(len(docs), 0.3, 5))
    assert not np.array_equal(a.val.array, c.val.array)  # shapes or contents differ


def test_val_fraction_zero_keeps_everything_in_train(tiny_tokenizer, docs, write_corpus):
    data = build_packed_data(write_corpus("txt", docs[:1]), tiny_tokenizer, 8, val_fraction=0.0)
    assert len(data.val) == 0 and data.val.seq_len == 8
    assert_packed(data.train, encode(tiny_tokenizer, docs[0]), 8)


def test_max_tokens_keeps_shortest_document_prefix(tiny_tokenizer, docs, write_corpus):
    lengths = np.array([len(encode(tiny_tokenizer, d)) for d in docs])
    cap = int(lengths[:10].sum()) - 3  # reached inside document 9 -> documents 0..9 are kept whole
    data = build_packed_data(write_corpus("jsonl", docs), tiny_tokenizer, 8, val_fraction=0.2, max_tokens=cap)
    assert data.meta["num_docs"] == 10
    exp_train, exp_val = expected_streams(tiny_tokenizer, docs[:10], split_documents(10, 0.2, 0))
    assert_packed(data.train, exp_train, 8)
    assert_packed(data.val, exp_val, 8)


def test_second_call_hits_cache(tiny_tokenizer, docs, write_corpus, tmp_path, monkeypatch):
    files = write_corpus("parquet", docs)
    cache = str(tmp_path / "cache")
    first = build_packed_data(files, tiny_tokenizer, 16, val_fraction=0.2, cache_dir=cache)
    entry = os.path.join(cache, first.fingerprint)
    assert sorted(os.listdir(entry)) == ["meta.json", "train.npy", "val.npy"]
    meta = json.loads(pathlib.Path(entry, "meta.json").read_text())
    assert meta["num_docs"] == len(docs)

    def boom(*args, **kwargs):
        raise AssertionError("cache miss: tried to load or tokenize")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    monkeypatch.setattr(datasets.Dataset, "map", boom)
    second = build_packed_data(files, tiny_tokenizer, 16, val_fraction=0.2, cache_dir=cache)
    assert second.fingerprint == first.fingerprint
    assert isinstance(second.train.array, np.memmap) and isinstance(second.val.array, np.memmap)
    assert np.array_equal(second.train.array, first.train.array)
    assert np.array_equal(second.val.array, first.val.array)
    assert second.meta == first.meta
    # any changed input is a miss (and here would hit `boom`)
    for kw in ({"seq_len": 8}, {"seed": 1}, {"max_tokens": 100}, {"val_fraction": 0.3}):
        args = {"seq_len": 16, "val_fraction": 0.2, **kw}
        with pytest.raises(AssertionError, match="cache miss"):
            build_packed_data(files, tiny_tokenizer, args.pop("seq_len"), cache_dir=cache, **args)
    os.utime(files[0], ns=(1, 1))
    with pytest.raises(AssertionError, match="cache miss"):
        build_packed_data(files, tiny_tokenizer, 16, val_fraction=0.2, cache_dir=cache)


def test_num_proc_gives_same_result(tiny_tokenizer, docs, write_corpus):
    files = write_corpus("jsonl", docs)
    a = build_packed_data(files, tiny_tokenizer, 16, val_fraction=0.2)
    b = build_packed_data(files, tiny_tokenizer, 16, val_fraction=0.2, num_proc=2)
    assert a.fingerprint == b.fingerprint and np.array_equal(a.train.array, b.train.array)


@pytest.mark.parametrize("advertise_columns", [True, False])
def test_hub_streaming_path(tiny_tokenizer, docs, write_corpus, monkeypatch, advertise_columns):
    calls = []

    def fake_load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        rows = {"content": docs, "id": list(range(len(docs)))}
        if advertise_columns:
            return datasets.Dataset.from_dict(rows).to_iterable_dataset()

        def gen():
            for i, d in enumerate(docs):
                yield {"content": d, "id": i}

        return datasets.IterableDataset.from_generator(gen)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    kw = {"hub_name": "org/corpus", "hub_config": "en", "hub_split": "train", "text_field": "content"}
    full = build_packed_data(None, tiny_tokenizer, 16, val_fraction=0.2, **kw)
    assert calls == [("org/corpus", "en", "train", True)]
    exp_train, exp_val = expected_streams(tiny_tokenizer, docs, split_documents(len(docs), 0.2, 0))
    assert_packed(full.train, exp_train, 16)
    assert_packed(full.val, exp_val, 16)

    lengths = np.array([len(encode(tiny_tokenizer, d)) for d in docs])
    capped = build_packed_data(
        None, tiny_tokenizer, 16, val_fraction=0.2, max_tokens=int(lengths[:12].sum()), **kw
    )
    assert capped.meta["num_docs"] == 12
    with pytest.raises(ValueError, match="'text'"):
        build_packed_data(None, tiny_tokenizer, 16, hub_name="org/corpus")


def test_unigram_cross_entropy_matches_direct_computation():
    vocab = 11
    rng = np.random.default_rng(0)
    train = PackedBlocks(rng.integers(0, 7, size=(20, 5)).astype(np.uint16))
    val = PackedBlocks(rng.integers(0, vocab, size=(6, 5)).astype(np.uint16))
    counts = Counter(int(t) for t in train.array.ravel())
    n = train.array.size
    val_tokens = [int(t) for t in val.array.ravel()]
    direct = -sum(math.log((counts[t] + 1) / (n + vocab)) for t in val_tokens) / len(val_tokens)
    assert unigram_cross_entropy(train, val, vocab) == pytest.approx(direct, rel=1e-12)
    uniform = PackedBlocks(np.zeros((0, 5), np.uint16))
    assert unigram_cross_entropy(uniform, val, vocab) == pytest.approx(math.log(vocab))
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_cross_entropy(train, val, 5)
    with pytest.raises(ValueError, match="val"):
        unigram_cross_entropy(train, uniform, vocab)


def test_packed_blocks_sequence_api():
    arr = np.arange(23, dtype=np.uint16)
    blocks = PackedBlocks(arr, seq_len=5)
    assert len(blocks) == 4 and blocks.num_tokens == 20 and blocks.seq_len == 5
    assert blocks[0].tolist() == [0, 1, 2, 3, 4] and blocks[-1].tolist() == [15, 16, 17, 18, 19]
    assert blocks[np.int64(1)].dtype == torch.long
    assert [b[0].item() for b in blocks] == [0, 5, 10, 15]
    assert blocks.get_batch([3, 0]).tolist() == [list(range(15, 20)), list(range(5))]
    assert len(blocks[1:3]) == 2
    with pytest.raises(IndexError):
        blocks[4]


def test_errors_are_clear(tiny_tokenizer, docs, write_corpus, tmp_path):
    tok = tiny_tokenizer
    good = write_corpus("jsonl", docs)
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="nope.jsonl.*no such file"):
        build_packed_data([*good, missing], tok, 16)
    other_ext = tmp_path / "data.csv"  # any UTF-8 text file is one document, whatever its extension
    other_ext.write_text("text\nhello\n")
    assert build_packed_data([*good, str(other_ext)], tok, 16).meta["num_docs"] == len(docs) + 1

    no_field = write_corpus("jsonl", docs[:3], field="body")
    with pytest.raises(ValueError, match=rf"{re.escape(no_field[0])}.*'text'"):
        build_packed_data(no_field, tok, 16)
    with pytest.raises(ValueError, match=rf"{re.escape(no_field[0])}.*'text'"):  # named even inside a group
        build_packed_data(good + no_field, tok, 16)
    pq_no_field = write_corpus("parquet", docs[:3], field="body")
    with pytest.raises(ValueError, match=rf"{re.escape(pq_no_field[0])}.*'text'"):
        build_packed_data(pq_no_field, tok, 16)
    holes = tmp_path / "holes.jsonl"
    holes.write_text('{"text": "a"}\n{"other": "b"}\n')
    with pytest.raises(ValueError, match="holes.jsonl' line 2: no 'text' field"):
        build_packed_data(good + [str(holes)], tok, 16)

    for seq_len in (0, -4):
        with pytest.raises(ValueError, match="seq_len"):
            build_packed_data(good, tok, seq_len)
    for frac in (1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            build_packed_data(good, tok, 16, val_fraction=frac)
    with pytest.raises(ValueError, match="seq_len=100000"):
        build_packed_data(good, tok, 100_000)
    with pytest.raises(ValueError, match="at least 2 documents"):
        build_packed_data(write_corpus("txt", docs[:1]), tok, 4, val_fraction=0.1)
    with pytest.raises(ValueError, match="exactly one of files"):
        build_packed_data(None, tok, 16)
    with pytest.raises(ValueError, match="no text to train on"):
        build_packed_data(write_corpus("jsonl", []), tok, 16, val_fraction=0.0)

    no_eos = tok.__class__(tokenizer_object=tok.backend_tokenizer)
    assert no_eos.eos_token_id is None
    with pytest.raises(ValueError, match="eos"):
        build_packed_data(good, no_eos, 16)


def test_chunked_tokenization_is_identical_and_stops_at_max_tokens(
    tiny_tokenizer, docs, write_corpus, monkeypatch
):
    import sapling.data.pack as pack

    files = write_corpus("jsonl", docs)
    ref = build_packed_data(files, tiny_tokenizer, 8, val_fraction=0.2)
    monkeypatch.setattr(pack, "CHUNK_DOCS", 5)
    monkeypatch.setattr(pack, "TOKENIZE_BATCH", 3)
    calls = []
    real_map = datasets.Dataset.map
    monkeypatch.setattr(
        datasets.Dataset, "map", lambda self, *a, **k: calls.append(len(self)) or real_map(self, *a, **k)
    )
    chunked = build_packed_data(files, tiny_tokenizer, 8, val_fraction=0.2)
    assert calls == [5, 5, 5, 5, 4]
    assert np.array_equal(chunked.train.array, ref.train.array) and np.array_equal(
        chunked.val.array, ref.val.array
    )

    calls.clear()
    cap = sum(len(encode(tiny_tokenizer, d)) for d in docs[:7])  # reached exactly at the end of doc 6
    capped = build_packed_data(files, tiny_tokenizer, 8, val_fraction=0.2, max_tokens=cap)
    assert capped.meta["num_docs"] == 7 and calls == [5, 5]  # later chunks are never tokenized


def test_tokenization_is_reused_when_only_packing_changes(
    tiny_tokenizer, docs, write_corpus, tmp_path, monkeypatch
):
    import sapling.data.pack as pack

    files = write_corpus("jsonl", docs)
    cache = str(tmp_path / "cache")
    build_packed_data(files, tiny_tokenizer, 16, val_fraction=0.2, cache_dir=cache)

    def boom(self, batch):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(pack._Tokenize, "__call__", boom)
    other = build_packed_data(files, tiny_tokenizer, 8, val_fraction=0.3, seed=2, cache_dir=cache)
    exp_train, _ = expected_streams(tiny_tokenizer, docs, split_documents(len(docs), 0.3, 2))
    assert_packed(other.train, exp_train, 8)
