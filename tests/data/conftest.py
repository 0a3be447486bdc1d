"""Fixtures for the data-pipeline tests: an offline byte-level BPE tokenizer and small corpora."""

from __future__ import annotations

import json
import os
import pathlib
import random
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

EOS = "<|endoftext|>"
STDLIB = pathlib.Path(os.__file__).parent
SOURCES = ("textwrap.py", "abc.py", "bisect.py", "fnmatch.py")


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path, monkeypatch):
    """Keep anything `datasets` writes by default (e.g. generator builders' locks) out of ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_default_cache")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """ByteLevel BPE with ~300 tokens trained on a few stdlib modules, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in SOURCES]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


@pytest.fixture(scope="session")
def docs() -> list[str]:
    """24 documents of varied length; each starts with a unique marker ``@@docNNN@@``."""
    src = (STDLIB / "os.py").read_text(encoding="utf-8").replace("\r", "")
    rng = random.Random(0)
    out = []
    for i in range(24):
        start = rng.randrange(len(src) - 1000)
        body = src[start : start + rng.randrange(5, 400)]
        out.append(f"@@doc{i:03d}@@ {body} é→{i}")
    return out


def _write_txt(root: pathlib.Path, docs: list[str], tag: str) -> list[str]:
    paths = []
    for i, doc in enumerate(docs):
        path = root / f"{tag}{i:03d}.txt"
        path.write_text(doc, encoding="utf-8")
        paths.append(str(path))
    return paths


def _write_jsonl(root: pathlib.Path, docs: list[str], tag: str, field: str = "text") -> list[str]:
    path = root / f"{tag}.jsonl"
    path.write_text(
        "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8"
    )
    return [str(path)]


def _write_parquet(root: pathlib.Path, docs: list[str], tag: str, field: str = "text") -> list[str]:
    path = root / f"{tag}.parquet"
    table = pa.table({"id": pa.array(range(len(docs)), pa.int64()), field: pa.array(docs, pa.string())})
    pq.write_table(table, path, row_group_size=5)
    return [str(path)]


WRITERS = {"txt": _write_txt, "jsonl": _write_jsonl, "parquet": _write_parquet}


@pytest.fixture
def write_corpus(tmp_path) -> Callable[..., list[str]]:
    """``write_corpus(kind, docs, **kw)`` writes docs under tmp_path as txt/jsonl/parquet; returns paths."""
    counter = iter(range(10**6))

    def write(kind: str, docs: list[str], **kw) -> list[str]:
        return WRITERS[kind](tmp_path, docs, f"{kind}{next(counter)}_", **kw)

    return write

