"""What some model families do to ``W·h`` before it is a logit: a multiplier and a final softcap.

``z' = softcap * tanh(scale * z / softcap)`` when ``softcap`` is set, else ``z' = scale * z``:

- Gemma 2 / Gemma 3: ``final_logit_softcapping`` (``cap * tanh(z / cap)``, scale 1);
- Cohere / Command R: ``logit_scale`` (scale);
- Granite: ``1 / logits_scaling`` (scale).

A fused loss that starts from ``W·h`` must apply it, or its KD loss and perplexity are those of another
model. The gradient through it needs only the transformed value: ``dz'/dz = scale * (1 - (z'/softcap)**2)``
(or ``scale``), so the fused loss keeps no extra copy of the raw logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LogitTransform"]


@dataclass(frozen=True)
class LogitTransform:
    """``z -> softcap * tanh(scale * z / softcap)`` (``softcap`` set) or ``z -> scale * z``."""

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"LogitTransform scale must be a finite number > 0, got {self.scale!r}")
        if self.softcap is not None and not (
            isinstance(self.softcap, (int, float)) and math.isfinite(self.softcap) and self.softcap > 0
        ):
            raise ValueError(f"LogitTransform softcap must be None or a finite number > 0, got {self.softcap!r}")

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, z: Tensor) -> Tensor:
        """The transformed logits (a new tensor; differentiable)."""
        if self.softcap is None:
            return z if self.scale == 1.0 else z * self.scale
        return torch.tanh(z * (self.scale / self.softcap)) * self.softcap

    def apply_(self, z: Tensor, want_factor: bool = True) -> Tensor | None:
        """Transform ``z`` in place. With ``want_factor``, returns the float32 factor ``f`` with
        ``dz'/dz = scale * f`` where it is not 1 (softcap: ``1 - (z'/softcap)**2``), else None; the caller
        multiplies the gradient by ``f`` and folds ``scale`` into its scalar coefficient."""
        if self.softcap is None:
            if self.scale != 1.0:
                z.mul_(self.scale)
            return None
        z.mul_(self.scale / self.softcap).tanh_()
        factor = z.float().square().neg_().add_(1.0) if want_factor else None  # 1 - tanh(.)**2
        z.mul_(self.softcap)
        return factor

    def describe(self) -> str:
        if self.softcap is None:
            return "none" if self.scale == 1.0 else f"logits x {self.scale:g}"
        scaled = "" if self.scale == 1.0 else f"{self.scale:g} * "
        return f"{self.softcap:g} * tanh({scaled}z / {self.softcap:g})"


def as_transform(value: LogitTransform | None, name: str) -> LogitTransform | None:
    """None for no transform (or the identity), else the LogitTransform; a ValueError naming `name` for
    anything else."""
    if value is None:
        return None
    if not isinstance(value, LogitTransform):
        raise ValueError(f"{name} must be a LogitTransform or None, got {type(value).__name__}")
    return None if value.is_identity else value
