"""quant.observer=mse: group scales clipped to the least rounding error, and GPTQ with them."""

from __future__ import annotations

import pytest
import torch

from sapling.quant.gptq import gptq
from sapling.quant.numerics import (
    QuantSpec,
    dequantize,
    expand_scales,
    group_scales,
    mse_group_scales,
    quantize_with_scales,
)


def _heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Weights with outliers (a log-normal spread of magnitudes), like real checkpoints'."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, cols, generator=g))


def _group_error(w: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    q = quantize_with_scales(w, expand_scales(scale, w.shape[1]), spec)
    d = (dequantize(q, scale).double() - w.double()) ** 2
    return d.reshape(w.shape[0], scale.shape[1], -1).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mse_scales_never_raise_a_groups_error_and_lower_the_total(dtype):
    spec = QuantSpec(bits=4, group_size=32, scale_dtype=dtype)
    w = _heavy_tailed(16, 128, seed=0)
    minmax, mse = group_scales(w, spec), mse_group_scales(w, spec)
    assert mse.dtype == dtype and mse.shape == minmax.shape
    e_minmax, e_mse = _group_error(w, minmax, spec), _group_error(w, mse, spec)
    assert bool((e_mse <= e_minmax * (1 + 1e-12)).all())
    assert float(e_mse.sum()) < 0.9 * float(e_minmax.sum())  # outliers clipped: a finer grid for the rest
    assert bool((mse <= minmax).all())  # only ever shrinks the absmax


def test_gptq_with_mse_scales_lowers_the_layer_output_error():
    g = torch.Generator().manual_seed(1)
    spec = QuantSpec(bits=4, group_size=32, scale_dtype=torch.float32)
    w = _heavy_tailed(32, 128, seed=2)
    x = torch.randn(2048, 128, generator=g) * torch.exp(torch.randn(128, generator=g) * 0.7)
    h = x.T @ x / x.shape[0]

    def out_err(observer: str) -> float:
        q, s = gptq(w, h, spec, act_order=True, observer=observer)
        d = dequantize(q, s).double() - w.double()
        return float(torch.trace(d @ h.double() @ d.T))

    assert out_err("mse") < out_err("minmax")
    with pytest.raises(ValueError, match="observer"):
        gptq(w, h, spec, observer="percentile")
