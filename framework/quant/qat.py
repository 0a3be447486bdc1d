"""Quantization-aware distillation (`quant.aware=true`): the student trains through its quantized weights.

Each linear that the export will quantize becomes a :class:`FakeQuantLinear` in place (same parameters
and state-dict names; under ZeRO-3 the partitioned parameters stay where DeepSpeed put them). Its
forward uses exactly the export's numerics: the weight cast to the export dtype, round-to-nearest with
the scale rounded to that dtype, dequantized in that dtype. The backward is the straight-through
estimator: the latent full-precision weights receive the gradient as if no rounding had happened.
After training, `hooks.post=[quantize]` with `method: auto` exports those latent weights with RTN,
which reproduces the integers and scales the last training step used: the exported model is the one
that was trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sapling.quant.layerwise import plan_targets
from sapling.quant.numerics import QuantSpec, fake_quantize_ste


class FakeQuantLinear(nn.Linear):
    """`nn.Linear` whose forward multiplies by the fake-quantized weight (see the module docstring)."""

    quant_spec: QuantSpec

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize_ste(self.weight, self.quant_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.linear(x, self.quantized_weight(), self.bias)


def enable_quant_aware(model: nn.Module, spec: QuantSpec, ignore: Sequence[str] = ("lm_head",),
                       skip_incompatible: bool = False) -> list[str]:
    """Turn the linears the export will quantize into FakeQuantLinear in place; returns their names."""
    targets, _, _ = plan_targets(model, spec, ignore, skip_incompatible)
    modules = dict(model.named_modules())
    for name in targets:
        m = modules[name]
        if type(m) not in (nn.Linear, FakeQuantLinear):
            raise TypeError(f"{name} is a {type(m).__name__}; quantization-aware training wraps plain nn.Linear")
        m.__class__ = FakeQuantLinear
        m.quant_spec = spec
    return targets


def disable_quant_aware(model: nn.Module) -> None:
    """Back to plain linears (the latent weights are kept)."""
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            m.__class__ = nn.Linear
            del m.quant_spec
