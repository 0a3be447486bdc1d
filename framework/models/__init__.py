"""Model loading/saving and per-architecture helpers."""

from sapling.models.hf import (
    apply_overrides,
    build_model,
    count_parameters,
    decoder_and_head,
    load_tokenizer,
    resolve_dtype,
    save_hf_checkpoint,
    source_config,
)
from sapling.models.tiny import TINY_CONFIGS, tiny_config

__all__ = [
    "TINY_CONFIGS",
    "apply_overrides",
    "build_model",
    "count_parameters",
    "decoder_and_head",
    "load_tokenizer",
    "resolve_dtype",
    "save_hf_checkpoint",
    "source_config",
    "tiny_config",
]
