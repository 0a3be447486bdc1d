"""What Sapling must know per model family that transformers does not expose uniformly: how the lm_head's
output becomes the model's logits (Gemma 2/3 softcap them, Cohere and Granite scale them).

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
