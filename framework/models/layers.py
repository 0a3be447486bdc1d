"""Where a causal LM's parts are, and the next-token view of a batch that every loss and metric shares.

`final_hidden` runs the decoder stack only (no lm_head), so the logits are formed later, chunk by chunk,
by the fused loss kernel or a top-k pass; `shifted_targets` are the labels those rows predict.
"""

from __future__ import annotations

import torch
from torch import nn

from sapling.data.blocks import IGNORE_INDEX  # noqa: F401  (re-exported: a label left out of every loss)
from sapling.errors import ModelSourceError
from sapling.models.hf import decoder_and_head


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets for positions 0..L-2 of each block, flattened."""
    return labels[:, 1:].reshape(-1)


def final_hidden(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final (post-norm) hidden states for positions that predict a next token: [B*(L-1), H].

    `position_ids` that restart within a block (documents packed one after another) keep attention within each
    document: transformers builds a block-diagonal causal mask from them (SDPA, eager) or runs flash-attn varlen.
    """
    decoder, _ = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    return hidden[:, :-1].reshape(-1, hidden.shape[-1])


def unwrap_hf(model: nn.Module) -> nn.Module:
    """The HF model inside the wrappers training puts around it: a DeepSpeed engine or DDP (`.module`), a
    module holding it as `.model` (`StudentWithFeatures`); `model` itself when it is one (or nothing is)."""
    while not hasattr(model, "base_model_prefix"):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def decoder_layers(model: nn.Module,
                   fix: str = "use a Llama, Mistral, Qwen or Gemma *ForCausalLM model") -> nn.ModuleList:
    """The decoder layers of an HF causal LM (`<base model>.layers`), also through the wrappers training puts
    around it (`unwrap_hf`). A model without them is a ModelSourceError ending with `fix`."""
    model = unwrap_hf(model)
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelSourceError(f"{type(model).__name__}: no decoder layers at <base model>.layers; "
                               "Sapling supports HF decoder-only causal LMs (Llama, Mistral, Qwen, Gemma); "
                               f"fix: {fix}")
    return layers
