"""Named tiny configs: real architectures at toy sizes, for tests and the demo (no hub needed)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

_COMMON: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)

TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-tiny": ("llama", {}),
    "mistral-tiny": ("mistral", {"sliding_window": None}),
    "qwen2-tiny": ("qwen2", {}),
    "qwen3-tiny": ("qwen3", {"head_dim": 16}),
    "granite-tiny": ("granite", {"embedding_multiplier": 4.0, "residual_multiplier": 0.5,
                                 "attention_multiplier": 0.2, "logits_scaling": 2.0}),
    "gemma2-tiny": ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
                               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    "gemma3-tiny": ("gemma3_text", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4}),
    "olmo2-tiny": ("olmo2", {"tie_word_embeddings": False}),
    "phi3-tiny": ("phi3", {"tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "cohere-tiny": ("cohere", {"use_qk_norm": True, "logit_scale": 0.5, "pad_token_id": 0, "bos_token_id": 1,
                               "eos_token_id": 2}),
    "cohere2-tiny": ("cohere2", {"sliding_window": 4, "logit_scale": 0.5, "pad_token_id": 0, "bos_token_id": 1,
                                 "eos_token_id": 2}),
    "qwen3-moe-tiny": ("qwen3_moe", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "norm_topk_prob": True, "mlp_only_layers": [],
                                     "decoder_sparse_step": 1}),
    "mixtral-tiny": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
                                 "sliding_window": None}),
    "olmoe-tiny": ("olmoe", {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
                             "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
}


def tiny_config(name: str, **overrides: Any) -> PretrainedConfig:
    """An HF config of the named tiny architecture, with `overrides` applied to its fields."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny config {name!r}; choose one of {', '.join(sorted(TINY_CONFIGS))}")
    model_type, extra = TINY_CONFIGS[name]
    return AutoConfig.for_model(model_type, **{**_COMMON, **extra, **overrides})
