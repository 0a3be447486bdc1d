"""The KD head: the student's lm_head, able to compute the fused distillation loss in its own forward.

Under DeepSpeed ZeRO-3 a parameter is only gathered while the module that owns it runs `forward`, and
its gradient is reduce-scattered by hooks on that module. The fused loss needs the student's lm_head
weight itself (not logits), so the loss must run *inside* the lm_head's forward: `install_kd_head`
turns the model's output embedding into a :class:`KDHead` (same parameters, same state-dict names,
tied embeddings kept), and `head(hidden, kd={...})` returns the loss instead of logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sapling.kernels import LogitTransform, fused_linear_kd_loss
from sapling.models.families import logit_transform
from sapling.models.layers import unwrap_hf


class KDHead(nn.Linear):
    """`nn.Linear` whose forward returns `fused_linear_kd_loss(...)` when given `kd=` arguments.

    `logit_transform` is the model's own step from this layer's output to its logits (Gemma's softcap,
    Cohere's / Granite's scale): the fused loss applies it. Called without `kd` (by the HF model's own
    forward, which applies the transform itself) it stays a plain linear layer.
    """

    logit_transform: LogitTransform | None = None
    # The distillation's vocabulary when the teacher's lm_head has another number of (padded) rows: the
    # tokenizer's size (see models.shapes.check_vocab). The loss step passes it as `kd["vocab"]`.
    kd_vocab: int | None = None

    def forward(self, hidden: torch.Tensor, kd: dict[str, Any] | None = None) -> Any:  # type: ignore[override]
        if kd is None:
            return F.linear(hidden, self.weight, self.bias)
        kd = dict(kd)
        weight, bias = first_rows(self.weight, self.bias, kd.pop("vocab", None))  # the rest get no probability
        return fused_linear_kd_loss(hidden, weight, student_bias=bias,
                                    student_logit_transform=self.logit_transform, **kd)


def first_rows(weight: torch.Tensor, bias: torch.Tensor | None,
               rows: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An lm_head's weight and bias cut to their first `rows` output rows (None: whole), as views (gradients
    flow back to the full parameters): the ids two vocabularies that differ in padded rows share."""
    if rows is None:
        return weight, bias
    return weight[:rows], None if bias is None else bias[:rows]


def install_kd_head(model: nn.Module, key: str = "model") -> KDHead:
    """Make `model`'s lm_head a KDHead in place (parameters untouched) and return it; a family whose logits
    Sapling has not checked is a ModelSourceError naming `key`."""
    head = model.get_output_embeddings()
    if isinstance(head, KDHead):
        return head
    if type(head) is not nn.Linear:
        raise TypeError(f"lm_head is a {type(head).__name__}, expected nn.Linear")
    transform = model_logit_transform(model, key)
    head.__class__ = KDHead
    head.logit_transform = transform
    return head


def model_logit_transform(model: nn.Module, key: str = "model") -> LogitTransform | None:
    """`logit_transform` of the HF config of `model` (through training's wrappers)."""
    return logit_transform(unwrap_hf(model).config, key)
