"""Weight-only symmetric integer quantization: the one set of numerics RTN, GPTQ, QAD and the export share.

A weight `W [out, in]` is quantized per output row in groups of `group_size` input columns (int4, w4a16)
or per output channel (int8, w8a16: one group spanning the row). Each group has a scale

    scale = absmax(group) / ((qmax - qmin) / 2)        (int4: absmax / 7.5, int8: absmax / 127.5)

stored in the export dtype (bf16 by default), and the integers are

    q = clamp(round(w / scale), qmin, qmax)             (int4: [-8, 7], int8: [-128, 127])

with round-half-to-even, the convention compressed-tensors (and so vLLM / transformers) use. The
dequantized weight is `q * scale` computed *in the scale's dtype*, which is exactly what
compressed-tensors' decompression computes, so a fake-quantized Sapling model and the exported
checkpoint loaded by transformers have bit-identical weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SCHEMES = {"w4a16": 4, "w8a16": 8}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class QuantSpec:
    """How weights are quantized: `bits` (4 or 8), `group_size` columns per scale (None: one per row)."""

    bits: int = 4
    group_size: int | None = 128
    scale_dtype: torch.dtype = torch.bfloat16

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def half_range(self) -> float:
        return (self.qmax - self.qmin) / 2

    def columns_per_group(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def fits(self, in_features: int) -> bool:
        """Whether a linear with this input width can be quantized (groups must tile the row)."""
        return self.group_size is None or in_features % self.group_size == 0

    @property
    def label(self) -> str:
        group = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"w{self.bits}{group}"


def spec_from_config(quant_cfg: Any) -> QuantSpec:
    """The QuantSpec of a `quant` config group: w4a16 groups of `group_size`; w8a16 per channel."""
    scheme = quant_cfg.scheme
    if scheme not in SCHEMES:
        raise ValueError(f"quant.scheme={scheme!r}: expected one of {sorted(SCHEMES)}")
    bits = SCHEMES[scheme]
    group = quant_cfg.group_size if bits == 4 else None
    return QuantSpec(bits=bits, group_size=group, scale_dtype=export_dtype(quant_cfg.dtype))


def export_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"quant.dtype={name!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def group_scales(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Scales `[out, in // group]` of `w [out, in]`, rounded to `spec.scale_dtype` (all-zero groups: 1)."""
    out, cols = w.shape
    g = spec.columns_per_group(cols)
    absmax = w.detach().float().reshape(out, cols // g, g).abs().amax(dim=-1)
    scale = torch.where(absmax > 0, absmax / spec.half_range, torch.ones_like(absmax))
    return scale.to(spec.scale_dtype)


MSE_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # fractions of a group's absmax the mse observer tries


def mse_group_scales(w: torch.Tensor, spec: QuantSpec, shrink: tuple[float, ...] = MSE_SHRINK) -> torch.Tensor:
    """Per group, the absmax scale shrunk by the factor in `shrink` whose rounding (outliers clipped) leaves the
    least squared error on the group's weights: clipping a few large weights buys a finer grid for the rest.
    Never worse than `group_scales` on that error (the factor 1.0 is tried first and kept on ties)."""
    base = group_scales(w, spec).double()
    out, cols = w.shape
    g = spec.columns_per_group(cols)
    wg = w.detach().double().reshape(out, cols // g, g)
    best, best_err = base.clone(), torch.full_like(base, float("inf"))
    for factor in shrink:
        s = (base * factor).to(spec.scale_dtype).double()  # the scale as the export stores it
        q = quantize_with_scales(wg, s[..., None], spec).double()  # the export's own rounding
        err = ((q * s[..., None] - wg) ** 2).sum(-1)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best.to(spec.scale_dtype)


OBSERVERS = {"minmax": group_scales, "mse": mse_group_scales}  # quant.observer: how GPTQ picks its scales


def expand_scales(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Per-column scales `[out, in]` from per-group scales `[out, groups]`."""
    return scale.repeat_interleave(in_features // scale.shape[1], dim=1)


def quantize_with_scales(w: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integers (int8 storage) of `w [out, in]` (or a column slice) for the given per-column scales."""
    return torch.clamp(torch.round(w.float() / scale.float()), spec.qmin, spec.qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`q * scale` in the scale's dtype (what the serving side computes), optionally cast to `dtype`."""
    full = expand_scales(scale, q.shape[1]) if scale.shape[1] != q.shape[1] else scale
    w = q.to(full.dtype) * full
    return w if dtype is None else w.to(dtype)


def rtn(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (q int8 [out, in], scale [out, groups])."""
    if not spec.fits(w.shape[1]):
        raise ValueError(f"input width {w.shape[1]} is not a multiple of the group size {spec.group_size}")
    scale = group_scales(w, spec)
    return quantize_with_scales(w, expand_scales(scale, w.shape[1]), spec), scale


def rtn_export(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN of `w` as the export stores it: the weight first cast to the export (scale) dtype."""
    return rtn(w.detach().to(spec.scale_dtype), spec)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`rtn_export` quantize-dequantize of `w`, returned in `w`'s dtype (the export numerics, no gradient)."""
    q, scale = rtn_export(w, spec)
    return dequantize(q, scale, w.dtype)


class _STEFakeQuant(torch.autograd.Function):
    """Forward: the export's quantize-dequantize; backward: the identity (straight-through estimator), in the
    latent weight's own dtype (casting to the export dtype inside autograd would round the gradient too)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:  # type: ignore[override]
        return fake_quantize(w, spec)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def fake_quantize_ste(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`fake_quantize` with a straight-through gradient, for quantization-aware training."""
    return _STEFakeQuant.apply(w, spec)
