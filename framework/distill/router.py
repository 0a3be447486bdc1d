"""The router auxiliary (load-balancing) loss of a mixture-of-experts student, kept during distillation.

An MoE model trained without it lets its router collapse onto a few experts. Transformers computes it in
`ForCausalLM.forward` from every layer's router logits; Sapling's step runs the decoder alone (the loss is
fused into the lm_head), so the logits are recorded by forward hooks on the routers (`mlp.gate`, output 0)
and the model family's own `load_balancing_loss_func` is applied to them: the same value the HF model adds
(times `router_aux_loss_coef`) when called with `output_router_logits=True`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from sapling.models import decoder_layers, unwrap_hf
from sapling.models.families import is_moe


def router_aux_weight(model: nn.Module, distill_cfg: Any) -> float:
    """`distill.router_aux_weight`, or the model's own `router_aux_loss_coef` when that is null; 0 for a dense
    model."""
    config = unwrap_hf(model).config
    if not is_moe(config):
        return 0.0
    weight = getattr(distill_cfg, "router_aux_weight", None)
    return float(getattr(config, "router_aux_loss_coef", 0.0) if weight is None else weight)


@contextlib.contextmanager
def capture_router_logits(model: nn.Module | None) -> Iterator[list[Tensor]]:
    """Within the block, record every decoder layer's router logits ([tokens, experts], with their autograd
    graph) of `model`'s forward; `None` records nothing."""
    logits: list[Tensor] = []
    handles = []
    if model is not None:
        def keep(_m: nn.Module, _args: tuple, out: Any) -> None:
            logits.append(out[0] if isinstance(out, tuple) else out)

        handles = [layer.mlp.gate.register_forward_hook(keep) for layer in decoder_layers(unwrap_hf(model))]
    try:
        yield logits
    finally:
        for h in handles:
            h.remove()


def router_aux_loss(model: nn.Module, logits: list[Tensor]) -> Tensor:
    """The family's load-balancing loss of the recorded router logits (all tokens count: packed blocks)."""
    hf = unwrap_hf(model)
    module = importlib.import_module(type(hf).__module__)
    config = hf.config
    return module.load_balancing_loss_func(tuple(logits), config.num_experts, config.num_experts_per_tok, None)
