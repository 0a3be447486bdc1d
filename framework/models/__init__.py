"""Model loading/saving and per-architecture helpers."""

from sapling.models.families import LOGIT_MODEL_TYPES, logit_transform
from sapling.models.hf import (
    apply_overrides,
    build_model,
    check_same_tokenizer,
    count_parameters,
    decoder_and_head,
    load_tokenizer,
    resolve_dtype,
    save_hf_checkpoint,
    source_config,
)
from sapling.models.init_scope import model_init_scope
from sapling.models.kd_head import KDHead, first_rows, install_kd_head, model_logit_transform
from sapling.models.layers import IGNORE_INDEX, decoder_layers, final_hidden, shifted_targets, unwrap_hf
from sapling.models.placement import place
from sapling.models.tiny import TINY_CONFIGS, tiny_config

__all__ = [
    "IGNORE_INDEX",
    "LOGIT_MODEL_TYPES",
    "TINY_CONFIGS",
    "KDHead",
    "apply_overrides",
    "build_model",
    "check_same_tokenizer",
    "count_parameters",
    "decoder_and_head",
    "decoder_layers",
    "final_hidden",
    "first_rows",
    "install_kd_head",
    "load_tokenizer",
    "logit_transform",
    "model_logit_transform",
    "model_init_scope",
    "place",
    "resolve_dtype",
    "save_hf_checkpoint",
    "shifted_targets",
    "source_config",
    "tiny_config",
    "unwrap_hf",
]
