"""What Sapling must know per model family that transformers does not expose uniformly: how the lm_head's
output becomes the model's logits (Gemma 2/3 softcap them, Cohere and Granite scale them), and which config
field holds a mixture-of-experts model's expert FFN width.

The fused loss starts from ``W·h``; a family whose transform Sapling has not checked (tests/models/
test_families.py: eval loss equals the HF model's own on a tiny config of it) is refused, never run with raw
logits, since its KD loss and perplexity would be silently wrong.
"""

from __future__ import annotations

from typing import Any

from sapling.errors import ModelSourceError
from sapling.kernels import LogitTransform

# model_type -> the config field that transforms its logits (None: the lm_head output is the logit)
_LOGIT_RULES: dict[str, str | None] = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
    "phi3": None,
    "olmo2": None,
    "gemma2": "final_logit_softcapping",
    "gemma3_text": "final_logit_softcapping",
    "cohere": "logit_scale",
    "cohere2": "logit_scale",
    "granite": "logits_scaling",
    "qwen3_moe": None,
    "mixtral": None,
    "olmoe": None,
}
LOGIT_MODEL_TYPES: tuple[str, ...] = tuple(_LOGIT_RULES)


def logit_transform(config: Any, key: str = "model") -> LogitTransform | None:
    """The transform from ``W·h`` to `config`'s logits (None: none); a ModelSourceError naming `key`, the
    model type and the supported ones for a family Sapling has not checked."""
    kind = getattr(config, "model_type", None)
    if kind not in _LOGIT_RULES:
        raise ModelSourceError(f"{key}: model type {kind!r} is not one whose logits Sapling has checked (its fused "
                               f"KD loss and perplexity start from the lm_head output); supported: "
                               f"{', '.join(LOGIT_MODEL_TYPES)}; fix: use a model of those types")
    field = _LOGIT_RULES[kind]
    value = None if field is None else getattr(config, field, None)
    if value is None:
        transform = LogitTransform()
    elif field == "final_logit_softcapping":
        transform = LogitTransform(softcap=float(value))
    elif field == "logit_scale":
        transform = LogitTransform(scale=float(value))
    else:  # logits_scaling: the logits are divided by it
        transform = LogitTransform(scale=1.0 / float(value))
    return None if transform.is_identity else transform


# Mixture-of-experts families (every decoder layer's MLP is a router `mlp.gate` [E, H] and fused experts
# `mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]): model_type -> the config field of
# the expert FFN width I. The number of experts is `num_experts` for all (Mixtral's `num_local_experts`
# answers to that name too).
MOE_WIDTH_FIELDS: dict[str, str] = {"qwen3_moe": "moe_intermediate_size", "mixtral": "intermediate_size",
                                    "olmoe": "intermediate_size"}


def is_moe(config: Any) -> bool:
    """Whether `config` is of a mixture-of-experts family Sapling prunes (MOE_WIDTH_FIELDS)."""
    return getattr(config, "model_type", None) in MOE_WIDTH_FIELDS


def moe_width_field(config: Any) -> str:
    """The config field of the expert FFN width of an MoE `config`."""
    return MOE_WIDTH_FIELDS[config.model_type]


def moe_layout_problem(config: Any) -> str | None:
    """Why an MoE config's layers are not all sparse (Qwen3-MoE's `mlp_only_layers`, `decoder_sparse_step`),
    or None: Sapling prunes MoE models whose every layer routes to experts."""
    if config.model_type == "qwen3_moe" and (list(getattr(config, "mlp_only_layers", []) or [])
                                             or int(getattr(config, "decoder_sparse_step", 1)) != 1):
        return (f"mlp_only_layers={list(config.mlp_only_layers)}, decoder_sparse_step={config.decoder_sparse_step}: "
                "some layers have a dense MLP instead of experts")
    return None
