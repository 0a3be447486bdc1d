"""Data pipeline: sources -> tokenize -> document split -> pack -> shuffle -> shard -> resumable loader."""

from sapling.data.blocks import PackedBlocks, PackedData
from sapling.data.loader import ResumableLoader
from sapling.data.pack import build_packed_data
from sapling.data.sources import STRUCTURED_EXTENSIONS
from sapling.data.split import split_documents
from sapling.data.stats import unigram_cross_entropy

__all__ = [
    "STRUCTURED_EXTENSIONS",
    "PackedBlocks",
    "PackedData",
    "ResumableLoader",
    "build_packed_data",
    "split_documents",
    "unigram_cross_entropy",
]
