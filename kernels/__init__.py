"""Loss kernels: the fused linear KD loss (torch reference and Triton)."""

from .chunk_torch import kd_chunk_loss_and_grad
from .fused_kd_loss import fused_linear_kd_loss
from .kd_loss_reference import DIVERGENCES, kd_loss_reference
from .logit_transform import LogitTransform

__all__ = ["DIVERGENCES", "LogitTransform", "fused_linear_kd_loss", "kd_chunk_loss_and_grad", "kd_loss_reference"]
