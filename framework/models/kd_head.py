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

from sapling.kernels import fused_linear_kd_loss


class KDHead(nn.Linear):
    """`nn.Linear` whose forward returns `fused_linear_kd_loss(...)` when given `kd=` arguments."""

    def forward(self, hidden: torch.Tensor, kd: dict[str, Any] | None = None) -> Any:  # type: ignore[override]
        if kd is None:
            return F.linear(hidden, self.weight, self.bias)
        return fused_linear_kd_loss(hidden, self.weight, student_bias=self.bias, **kd)


def install_kd_head(model: nn.Module) -> KDHead:
    """Make `model`'s lm_head a KDHead in place (parameters untouched) and return it."""
    head = model.get_output_embeddings()
    if isinstance(head, KDHead):
        return head
    if type(head) is not nn.Linear:
        raise TypeError(f"lm_head is a {type(head).__name__}, expected nn.Linear")
    head.__class__ = KDHead
    return head
